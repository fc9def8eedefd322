function byId(id) { return document.getElementById(id); }
function h(tag, attrs, text) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}
function stat(value, label) {
  const box = h("div", {class: "stat"});
  box.append(h("b", {}, String(value)), h("span", {}, label));
  return box;
}
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds), m = Math.floor(s / 60), hrs = Math.floor(m / 60);
  return hrs ? hrs + " h " + (m % 60) + " min" : m ? m + " min " + (s % 60) + " s" : s + " s";
}
function load(url, render) {
  fetch(url, {credentials: "same-origin"}).then(r => {
    if (!r.ok) throw new Error("HTTP " + r.status + (r.status === 401 ? ": log in to Airflow first" :
                                                     r.status === 403 ? ": no read access to this DAG" : ""));
    return r.json();
  }).then(render).catch(e => document.body.append(h("div", {class: "problems"}, String(e.message || e))));
}
(function followAirflowTheme() {
  // Same origin as Airflow's UI: follow its light/dark toggle, else the system's preference.
  let dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
  try {
    const root = window.parent.document.documentElement;
    if (window.parent !== window) dark = root.classList.contains("dark") || root.style.colorScheme === "dark";
  } catch (e) { /* not framed by Airflow */ }
  document.documentElement.classList.toggle("dark", dark);
})();
