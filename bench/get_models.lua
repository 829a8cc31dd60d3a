-- wrk script for bench/nginx_ab.py: GET /v1/models, a request the gate answers itself (no pool hop).
wrk.method = "GET"
wrk.path = "/v1/models"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")
