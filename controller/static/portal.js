// Patronus operator portal: live updates and small conveniences. Loaded from the portal's own
// origin (the Content-Security-Policy allows no inline script). Without it every page still
// works; it only saves reloading.
"use strict";

(function () {
  // The tenant picker switches as soon as a tenant is chosen.
  const picker = document.getElementById("tenant-picker");
  if (picker && picker.form) {
    picker.addEventListener("change", () => picker.form.submit());
  }

  // Destructive forms ask first.
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) {
        event.preventDefault();
      }
    });
  });

  // Live pages: on every event of this tenant, fetch the page's live fragment again (the
  // server renders it, escaped, from the same data as the page) and swap it in.
  const body = document.body;
  const live = document.getElementById("live");
  if (!body.dataset.live || !live || !window.WebSocket) {
    return;
  }
  const tenant = body.dataset.tenant;
  let pending = null;
  let delay = 1000;

  function refresh() {
    pending = null;
    const url = new URL(window.location.href);
    url.searchParams.set("fragment", "live");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then((response) => (response.ok ? response.text() : Promise.reject(response.status)))
      .then((html) => {
        const doc = new DOMParser().parseFromString(html, "text/html");
        const fresh = doc.getElementById("live");
        if (fresh) {
          live.replaceChildren(...fresh.childNodes);
          body.dataset.liveUpdated = String(Date.now());
        }
      })
      .catch(() => {});
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${window.location.host}/ws/sdwan?tenant=${encodeURIComponent(tenant)}`);
    socket.addEventListener("open", () => {
      delay = 1000;
      body.dataset.liveConnected = "1";
    });
    socket.addEventListener("message", () => {
      if (!pending) {
        pending = window.setTimeout(refresh, 300);
      }
    });
    socket.addEventListener("close", () => {
      body.dataset.liveConnected = "0";
      window.setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    });
  }
  connect();
})();
