// The page's only back end: the management API (/api/v1, /auth; contract: /api/v1/openapi.json).
// Cookie session (HttpOnly, never readable here); state-changing calls echo the csrf_token cookie in
// X-CSRF-Token (double submit). Every error becomes an ApiError with the server's message and field.

export class ApiError extends Error {
  constructor(status, body, headers) {
    super((body && (body.message || (body.error && body.error.message))) || `HTTP ${status}`);
    this.status = status;
    this.field = body && body.error ? body.error.field : null;
    this.nginx = body ? body.nginx || null : null; // nginx's own words when it refused a config
    const retry = headers ? headers.get("Retry-After") : null;
    this.retryAfter = retry ? Number(retry) : null;
  }
}

function csrfToken() {
  const m = document.cookie.match(/(?:^|;\s*)csrf_token=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}

let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

export async function request(method, path, { body, query, raw = false } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") params.set(k, v);
    const qs = params.toString();
    if (qs) url += (url.includes("?") ? "&" : "?") + qs;
  }
  const headers = { Accept: "application/json" };
  // on every call: some admin reads act too (listing an upstream's Ollama models asks the upstream), and the
  // manager wants the token for those as for changes
  headers["X-CSRF-Token"] = csrfToken();
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  if (raw && response.ok) return response;
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { message: text.slice(0, 500) }; }
  if (!response.ok) {
    const error = new ApiError(response.status, data, response.headers);
    if (response.status === 401 && !path.startsWith("/auth/login")) onUnauthorized(error);
    throw error;
  }
  return data;
}

const get = (path, query) => request("GET", path, { query });
const send = (method) => (path, body, query) => request(method, path, { body, query });
const post = send("POST"), patch = send("PATCH"), del = send("DELETE"), put = send("PUT");
const enc = encodeURIComponent;

// One function per operation the page uses; the names follow the OpenAPI paths.
export const api = {
  login: (username, password) => post("/auth/login", { username, password }),
  logout: () => post("/auth/logout"),
  me: () => get("/auth/me"),
  health: () => get("/api/v1/health"),
  settings: () => get("/api/v1/settings"),
  updateSettings: (fields) => patch("/api/v1/settings", fields),
  keys: (includeRevoked = false) => get("/api/v1/keys", { include_revoked: includeRevoked ? "true" : "" }),
  key: (id) => get(`/api/v1/keys/${enc(id)}`),
  createKey: (fields) => post("/api/v1/keys", fields),
  updateKey: (id, fields) => patch(`/api/v1/keys/${enc(id)}`, fields),
  revokeKey: (id) => del(`/api/v1/keys/${enc(id)}`),
  cidrGroups: () => get("/api/v1/cidr-groups"),
  createCidrGroup: (fields) => post("/api/v1/cidr-groups", fields),
  updateCidrGroup: (name, fields) => patch(`/api/v1/cidr-groups/${enc(name)}`, fields),
  removeCidrGroup: (name) => del(`/api/v1/cidr-groups/${enc(name)}`),
  users: () => get("/api/v1/users"),
  createUser: (fields) => post("/api/v1/users", fields),
  updateUser: (name, fields) => patch(`/api/v1/users/${enc(name)}`, fields),
  removeUser: (name) => del(`/api/v1/users/${enc(name)}`),
  pools: () => get("/api/v1/pools"),
  createPool: (fields) => post("/api/v1/pools", fields),
  updatePool: (name, fields) => patch(`/api/v1/pools/${enc(name)}`, fields),
  removePool: (name) => del(`/api/v1/pools/${enc(name)}`),
  refreshPool: (name) => post(`/api/v1/pools/${enc(name)}/refresh`),
  addUpstream: (name, upstream) => post(`/api/v1/pools/${enc(name)}/upstreams`, upstream),
  removeUpstream: (name, url) => del(`/api/v1/pools/${enc(name)}/upstreams`, undefined, { url }),
  ollamaModels: (name, upstream) => get(`/api/v1/pools/${enc(name)}/ollama/models`, { upstream }),
  deleteOllamaModel: (name, upstream, model) =>
    del(`/api/v1/pools/${enc(name)}/ollama/models`, undefined, { upstream, model }),
  ollamaPulls: (name) => get(`/api/v1/pools/${enc(name)}/ollama/pulls`),
  pullOllamaModel: (name, upstream, model) => post(`/api/v1/pools/${enc(name)}/ollama/pulls`, { upstream, model }),
  routes: () => get("/api/v1/routes"),
  setRoute: (model, pools, mode) => post("/api/v1/routes", mode ? { model, pools, mode } : { model, pools }),
  removeRoute: (model) => del(`/api/v1/routes/${enc(model)}`),
  configStatus: () => get("/api/v1/config"),
  configLive: () => get("/api/v1/config/live"),
  configApply: () => post("/api/v1/config/apply"),
  configHistory: () => get("/api/v1/config/history"),
  configGeneration: (n) => get(`/api/v1/config/history/${enc(n)}`),
  configRollback: (generation) => post("/api/v1/config/rollback", { generation }),
  setCustomConfig: (config) => post("/nginx/config/update", { config }),
  usageSummary: (query) => get("/api/v1/usage/summary", query),
  usageRecords: (query) => get("/api/v1/usage", query),
  usageCsvUrl: (path, query) => {
    const params = new URLSearchParams({ ...query, format: "csv" });
    for (const [k, v] of [...params]) if (v === "" || v === "undefined") params.delete(k);
    return `${path}?${params}`;
  },
  metricsText: () => request("GET", "/metrics", { raw: true }).then((r) => r.text()),
  blocks: () => get("/api/v1/blocks"),
  certificates: () => get("/api/v1/certificates"),
  obtainCertificate: (fields) => post("/api/v1/certificates", fields),
  uploadCertificate: (fields) => post("/api/v1/certificates/upload", fields),
  renewCertificate: (name, force) => post(`/api/v1/certificates/${enc(name)}/renew`, { force_renewal: force }),
  certificateJobs: () => get("/api/v1/certificates/jobs"),
  certificateJob: (id) => get(`/api/v1/certificates/jobs/${enc(id)}`),
  startCertificateJob: (fields) => post("/api/v1/certificates/jobs", fields),
  removeCertificate: (name) => del(`/api/v1/certificates/${enc(name)}`),
  setCloudflareToken: (token) => put("/api/v1/certificates/cloudflare-token", { token }),
  clearBlock: (address) => del(`/api/v1/blocks/${address.split("/").map(enc).join("/")}`),
  clearBlocks: () => del("/api/v1/blocks"),
  audit: (limit = 200) => get("/api/v1/audit", { limit }),
};
