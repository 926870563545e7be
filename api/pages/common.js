// The API key: from a #key= fragment or the key box, remembered in this browser (localStorage); none = public
// jobs only. A fragment never leaves the browser and the key travels only in the X-API-Key header of the page's
// own requests, so no URL that reaches the server (or its access log, or a proxy's) holds it. A ?key= from an
// old link is dropped from the address bar and not used.
const KEY_STORE = "bitsearch-key";
const KEY = (() => {
  const fragment = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fragment) localStorage.setItem(KEY_STORE, fragment);
  const query = new URLSearchParams(location.search);
  if (fragment || query.has("key")) {
    query.delete("key");
    history.replaceState(null, "", location.pathname + (query.toString() ? "?" + query : ""));
  }
  return localStorage.getItem(KEY_STORE);
})();
function keyBox() {
  const form = document.createElement("form");
  form.id = "key-box";
  form.innerHTML = KEY
    ? `<span class="muted">using API key ${esc(KEY.slice(0, 8))}&hellip;</span> <button type="button" id="key-forget">forget key</button>`
    : `<label for="key-input">API key</label> <input type="password" id="key-input" placeholder="bsk_..." autocomplete="off" size="28"> <button type="submit">use key</button>`;
  form.addEventListener("submit", e => {
    e.preventDefault();
    const k = form.querySelector("#key-input").value.trim();
    if (k) { localStorage.setItem(KEY_STORE, k); location.reload(); }
  });
  const forget = form.querySelector("#key-forget");
  if (forget) forget.addEventListener("click", () => { localStorage.removeItem(KEY_STORE); location.reload(); });
  document.body.prepend(form);
}
// Points at the key box (and puts the cursor in it) from a message elsewhere on the page.
function focusKeyBox() {
  const box = document.getElementById("key-box"), input = document.getElementById("key-input");
  box.classList.remove("attention"); void box.offsetWidth; box.classList.add("attention");
  if (input) input.focus();
}
const api = (path) => fetch(path, {headers: KEY ? {"X-API-Key": KEY} : {}});
async function downloadConfig(id) {
  const r = await api(`/candidates/${id}/config`); if (!r.ok) { alert((await r.json()).detail); return; }
  const a = document.createElement("a"); a.href = URL.createObjectURL(await r.blob());
  a.download = `bitsearch-candidate-${id}.json`; a.click(); URL.revokeObjectURL(a.href);
}
// A validation state as the API reports it (a validation record's status, or why a candidate has none: see
// api/routes/leaderboard.py) in words, with what it means on hover.
const VALIDATION = {
  succeeded: ["validated", "top-1 measured on the compiled low-bit kernels"],
  failed: ["validation failed", "the kernels could not run this candidate"],
  queued: ["queued for validation", "waiting for a worker to run it on the kernels"],
  running: ["validating", "running on the kernels now"],
  pending: ["to be validated", "chosen for validation; the worker is about to queue it"],
  "not selected": ["not selected for validation", "only a job's validate_top_k most accurate Pareto candidates are run on the kernels; the accuracy shown is simulated"],
  "not validated": ["not validated", "the workers did not validate this job's candidates (no kernels on them?); the accuracy shown is simulated"],
};
const validationText = s => (VALIDATION[s] || [s])[0];
const validationCell = s => `<span title="${esc((VALIDATION[s] || [s, ""])[1])}">${esc(validationText(s))}</span>`;
const pct = x => x == null ? "–" : (100 * x).toFixed(2);
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const COMMON_CSS = `
  #key-box { float: right; font-size: 12px; margin: 0 0 8px 16px; padding: 4px 6px; border-radius: 4px; }
  #key-box.attention { animation: attention 1.6s; }
  @keyframes attention { 0%, 60% { background: #ffe58a; } 100% { background: transparent; } }
  .notice { background: #f3f6fb; border-left: 3px solid #1f77b4; padding: 6px 10px; margin: 10px 0; }
  .notice button.link { border: 0; background: none; padding: 0; color: #0645ad; text-decoration: underline; cursor: pointer; font: inherit; }
`;
document.head.insertAdjacentHTML("beforeend", `<style>${COMMON_CSS}</style>`);
keyBox();
