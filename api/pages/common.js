// The API key: from ?key= (then remembered in this browser) or from an earlier visit; none = public only.
const KEY = (() => { const k = new URLSearchParams(location.search).get("key");
  if (k) { localStorage.setItem("bitsearch-key", k); history.replaceState(null, "", location.pathname); }
  return k || localStorage.getItem("bitsearch-key"); })();
const api = (path) => fetch(path, {headers: KEY ? {"X-API-Key": KEY} : {}});
async function downloadConfig(id) {
  const r = await api(`/candidates/${id}/config`); if (!r.ok) { alert((await r.json()).detail); return; }
  const a = document.createElement("a"); a.href = URL.createObjectURL(await r.blob());
  a.download = `bitsearch-candidate-${id}.json`; a.click(); URL.revokeObjectURL(a.href);
}
const pct = x => x == null ? "–" : (100 * x).toFixed(2);
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
