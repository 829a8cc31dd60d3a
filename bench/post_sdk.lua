-- bench/post.lua with the headers the OpenAI Python SDK (1.x) sends: what real clients add to every request.
wrk.method = "POST"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["User-Agent"] = "OpenAI/Python 1.54.3"
wrk.headers["X-Stainless-Lang"] = "python"
wrk.headers["X-Stainless-Package-Version"] = "1.54.3"
wrk.headers["X-Stainless-OS"] = "Linux"
wrk.headers["X-Stainless-Arch"] = "x64"
wrk.headers["X-Stainless-Runtime"] = "CPython"
wrk.headers["X-Stainless-Runtime-Version"] = "3.11.7"
wrk.headers["X-Stainless-Async"] = "false"
wrk.headers["X-Stainless-Retry-Count"] = "0"
wrk.headers["X-Stainless-Read-Timeout"] = "600"
