// TLS certificates: days left, obtain from the ACME server (HTTP-01 or Cloudflare DNS-01), upload PEM, renew,
// remove. certbot runs inside the request, so obtaining and renewing show a running state until it answers.
import { badge, clear, confirmDialog, errorBox, field, h, list, modal, table, toast, when } from "../dom.js";

export const title = "Certificates";

export async function render(ctx) {
  const { api, admin, root } = ctx;
  const body = h("div"), progress = h("div", { "aria-live": "polite" });
  clear(root, h("div", { class: "page-head" }, h("h1", {}, "Certificates"),
    admin ? [h("button", { class: "primary", onclick: obtain }, "Obtain"), h("button", { onclick: upload }, "Upload"),
      h("button", { onclick: cloudflare }, "Cloudflare token")] : null), progress, body);

  async function load() {
    clear(body, table([
      ["Name", (c) => c.name], ["Domains", (c) => c.domains.join(", ")], ["Source", (c) => c.source],
      ["Issuer", (c) => c.issuer ?? "—"], ["Expires", (c) => when(c.not_after)],
      ["Days left", (c) => badge(String(c.days_left ?? "?"), c.days_left === null ? "" : c.days_left < 14 ? "bad" : c.days_left < 30 ? "warn" : "ok")],
      ["Last renewal", (c) => (c.last_renewal ? [when(c.last_renewal.time), " ", badge(c.last_renewal.ok ? "ok" : "failed",
        c.last_renewal.ok ? "ok" : "bad")] : "—")],
      ["", (c) => admin ? h("div", { class: "row-actions" },
        c.source === "acme" ? h("button", { class: "small", onclick: () => renew(c) }, "Renew") : null,
        h("button", { class: "small danger", onclick: () => remove(c) }, "Remove")) : null],
    ], await api.certificates(), { empty: "No certificates. Obtain one from Let's Encrypt or upload one." }));
  }

  async function running(text, fn) {
    const started = Date.now();
    const line = h("p", { class: "notice" }, text);
    clear(progress, line);
    const timer = setInterval(() => clear(line, `${text} (${Math.round((Date.now() - started) / 1000)} s)`), 1000);
    try {
      const result = await fn();
      clear(progress);
      return result;
    } catch (error) {
      clear(progress, errorBox(error));
      return null;
    } finally { clearInterval(timer); }
  }

  async function obtain() {
    const values = await modal("Obtain a certificate", h("div", {},
      field("Domains", { name: "domains", required: true, placeholder: "llm.example.com" }, "Comma-separated; the first names the certificate."),
      field("Challenge", h("select", { name: "challenge" }, h("option", { value: "http-01" }, "HTTP-01 (port 80 reaches Bastion)"),
        h("option", { value: "dns-01" }, "DNS-01 (Cloudflare token)")))), {
      submitLabel: "Obtain", onSubmit: (f) => ({ domains: list(f.elements.domains.value), challenge: f.elements.challenge.value }),
    });
    if (!values) return;
    const cert = await running(`Running certbot for ${values.domains.join(", ")}…`, () => api.obtainCertificate(values));
    if (cert) toast(`certificate ${cert.name} obtained`);
    await load();
  }

  async function upload() {
    const saved = await modal("Upload a certificate", h("div", {},
      field("Domains", { name: "domains", required: true }),
      field("Certificate chain (PEM)", h("textarea", { name: "certificate", rows: 5, required: true })),
      field("Private key (PEM)", h("textarea", { name: "private_key", rows: 5, required: true }), "Stored 0600; never shown again.")), {
      submitLabel: "Upload",
      onSubmit: (f) => api.uploadCertificate({ domains: list(f.elements.domains.value),
        certificate: f.elements.certificate.value, private_key: f.elements.private_key.value }),
    });
    if (saved) { toast(`certificate ${saved.name} stored`); await load(); }
  }

  async function cloudflare() {
    const saved = await modal("Cloudflare API token", h("div", {},
      field("Token", { name: "token", type: "password", autocomplete: "off" }, "Write-only. Empty removes it.")), {
      onSubmit: (f) => api.setCloudflareToken(f.elements.token.value || null),
    });
    if (saved) toast(saved.token_set ? "token set" : "token removed");
  }

  async function renew(c) {
    const result = await running(`Renewing ${c.name}…`, () => api.renewCertificate(c.name, false));
    if (result) toast(result.message, result.ok ? "ok" : "error");
    await load();
  }

  async function remove(c) {
    if (!(await confirmDialog(`Remove ${c.name}?`, "HTTPS for its domains stops with the next apply.", "Remove"))) return;
    await api.removeCertificate(c.name).then(() => toast(`${c.name} removed`), (e) => toast(e.message, "error"));
    await load();
  }

  await load();
}
