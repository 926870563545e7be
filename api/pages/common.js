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
  form.style.cssText = "float: right; font-size: 12px;";
  form.innerHTML = KEY
    ? `<span class="muted">using API key ${esc(KEY.slice(0, 8))}&hellip;</span> <button type="button" id="key-forget">forget key</button>`
    : `<input type="password" id="key-input" placeholder="API key (bsk_...)" autocomplete="off" size="28"> <button type="submit">use key</button>`;
  form.addEventListener("submit", e => {
    e.preventDefault();
    const k = form.querySelector("#key-input").value.trim();
    if (k) { localStorage.setItem(KEY_STORE, k); location.reload(); }
  });
  const forget = form.querySelector("#key-forget");
  if (forget) forget.addEventListener("click", () => { localStorage.removeItem(KEY_STORE); location.reload(); });
  document.body.prepend(form);
}
const api = (path) => fetch(path, {headers: KEY ? {"X-API-Key": KEY} : {}});
async function downloadConfig(id) {
  const r = await api(`/candidates/${id}/config`); if (!r.ok) { alert((await r.json()).detail); return; }
  const a = document.createElement("a"); a.href = URL.createObjectURL(await r.blob());
  a.download = `bitsearch-candidate-${id}.json`; a.click(); URL.revokeObjectURL(a.href);
}
const pct = x => x == null ? "–" : (100 * x).toFixed(2);
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
keyBox();
