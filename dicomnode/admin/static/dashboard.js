// dicomnode dashboard: refreshes the page content in place and sends actions to the API.
(function () {
  "use strict";
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  let busy = false;

  function flash(text, ok) {
    const el = document.getElementById("flash");
    if (!el) return;
    el.textContent = text;
    el.className = ok ? "ok" : "error";
  }

  async function refresh() {
    if (busy || document.hidden) return;
    try {
      const rsp = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (rsp.redirected || !rsp.ok) return;
      const doc = new DOMParser().parseFromString(await rsp.text(), "text/html");
      const fresh = doc.getElementById("content");
      const here = document.getElementById("content");
      if (fresh && here && !busy) {
        here.replaceWith(fresh);
        const stamp = document.getElementById("refreshed");
        if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
      }
    } catch (e) {
      const stamp = document.getElementById("refreshed");
      if (stamp) stamp.textContent = "node unreachable";
    }
  }

  async function act(button) {
    const question = button.dataset.confirm;
    if (question && !window.confirm(question)) return;
    busy = true;
    button.disabled = true;
    try {
      const rsp = await fetch(button.dataset.action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf(), Accept: "application/json" },
      });
      let body = {};
      try { body = await rsp.json(); } catch (e) { /* not JSON */ }
      const label = button.dataset.label || "action";
      flash(label + ": " + (body.message || body.detail || rsp.status), rsp.ok);
    } catch (e) {
      flash("the node did not answer", false);
    } finally {
      busy = false;
      await refresh();
    }
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest("button.act");
    if (button) { ev.preventDefault(); act(button); return; }
    if (ev.target.id === "logout") {
      fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf() } })
        .finally(() => { location.href = "/login"; });
    }
  });

  const every = Number(document.body.dataset.refresh || 0);
  if (every > 0) setInterval(refresh, every * 1000);
})();
