// TLS certificates: days left, obtain from the ACME server (HTTP-01 or Cloudflare DNS-01), upload PEM, renew,
// remove. Obtaining and renewing run as jobs in the manager: the page polls the job and lists each step as it
// happens (Bastion's checks and certbot's lines), then the certificate or certbot's reason.
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

  // obtain and renew run as jobs in the manager (they outlive the page); this polls the job and lists its steps
  let followed = 0; // the job shown: a newer one stops the polling of the previous one
  async function follow(job) {
    const mine = ++followed;
    const current = () => mine === followed && progress.isConnected;
    while (job.state === "running" && current()) {
      clear(progress, jobView(job));
      await new Promise((resolve) => setTimeout(resolve, 700));
      try { job = await api.certificateJob(job.id); } catch (error) {
        if (current()) clear(progress, errorBox(error));
        return null;
      }
    }
    if (!current()) return null;
    clear(progress, jobView(job));
    await load();
    return job;
  }

  async function run(fields) {
    followed += 1; // the job shown until now stops being polled
    clear(progress);
    let job;
    try { job = await api.startCertificateJob(fields); } catch (error) { clear(progress, errorBox(error)); return null; }
    return follow(job);
  }

  async function obtain() {
    const values = await modal("Obtain a certificate", h("div", {},
      field("Domains", { name: "domains", required: true, placeholder: "llm.example.com" }, "Comma-separated; the first names the certificate."),
      field("Challenge", h("select", { name: "challenge" }, h("option", { value: "http-01" }, "HTTP-01 (port 80 reaches Bastion)"),
        h("option", { value: "dns-01" }, "DNS-01 (Cloudflare token)")))), {
      submitLabel: "Obtain", onSubmit: (f) => ({ domains: list(f.elements.domains.value), challenge: f.elements.challenge.value }),
    });
    if (!values) return;
    const job = await run({ action: "obtain", ...values });
    if (job?.state === "done") toast(`certificate ${job.name} obtained`);
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
    const job = await run({ action: "renew", name: c.name, force_renewal: false });
    if (job?.state === "done") toast(job.status);
  }

  async function remove(c) {
    if (!(await confirmDialog(`Remove ${c.name}?`, "HTTPS for its domains stops with the next apply.", "Remove"))) return;
    await api.removeCertificate(c.name).then(() => toast(`${c.name} removed`), (e) => toast(e.message, "error"));
    await load();
  }

  await load();
  if (admin) { // a job started earlier (here, in another tab, by another admin) is followed to its end
    const jobs = await api.certificateJobs();
    const busy = jobs.find((j) => j.state === "running");
    if (busy) follow(busy); // not awaited: the page is ready while the job runs
  }
}

const JOB_KIND = { running: "", done: "ok", failed: "bad", interrupted: "warn" };

/** A job as the page shows it: what it does, its state, each step so far, and certbot's reason if it failed. */
function jobView(job) {
  const verb = job.action === "obtain" ? `Obtaining ${job.name}` : `Renewing ${job.name}`;
  const seconds = Math.round((job.finished ?? job.updated) - job.started);
  return h("section", { class: "cert-job", "aria-label": "Certificate job" },
    h("div", {}, h("strong", {}, verb), " ", badge(job.state, JOB_KIND[job.state]), " ",
      h("span", { class: "hint" }, `${seconds} s`)),
    h("ol", { class: "cert-steps" }, job.steps.map((step) => h("li", {}, step.text))),
    job.error ? h("div", { class: "error-box", role: "alert" }, h("pre", { class: "cert-error" }, job.error)) : null);
}
