// simsearch's web page: drop or pick an image, see its nearest indexed images, click to go on.
// Plain JavaScript against the JSON API (POST /api/query, GET /api/similar); no build step.
"use strict";

(() => {
  const fileInput = document.getElementById("file");
  const drop = document.getElementById("drop");
  const results = document.getElementById("results");
  const status = document.getElementById("status");
  const kInput = document.getElementById("k");
  const preview = document.getElementById("query-preview");
  let previewUrl = null;
  let searchNumber = 0; // only the latest search may paint the grid

  function neighbours() {
    const value = parseInt(kInput.value, 10);
    return Number.isFinite(value) && value >= 1 ? Math.min(value, 1000) : 12;
  }

  function setStatus(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function showPreview(src) {
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
      previewUrl = null;
    }
    preview.src = src;
    preview.hidden = false;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      const detail = body.detail !== undefined ? body.detail : body.message;
      return typeof detail === "string" ? detail : JSON.stringify(detail);
    } catch (_) {
      return `${response.status} ${response.statusText}`;
    }
  }

  function baseName(path) {
    const parts = String(path).split(/[\\/]/);
    return parts[parts.length - 1];
  }

  function render(data) {
    const figures = data.results.map((result) => {
      const figure = document.createElement("figure");
      figure.className = "result";
      figure.dataset.sha1 = result.sha1;
      figure.tabIndex = 0;
      figure.title = `${result.path}\nrank ${result.rank}, distance ${result.distance}\n` +
        "click to search from this image";
      const img = document.createElement("img");
      img.src = result.thumbnail || `/thumbnails/${result.sha1}`;
      img.alt = baseName(result.path);
      img.loading = "lazy";
      const caption = document.createElement("figcaption");
      caption.textContent = result.distance.toFixed(4);
      figure.append(img, caption);
      return figure;
    });
    results.replaceChildren(...figures);
  }

  async function search(label, request) {
    const number = ++searchNumber;
    setStatus(`Searching for images like ${label}…`);
    const started = performance.now();
    let response;
    try {
      response = await request();
    } catch (error) {
      if (number === searchNumber) setStatus(`Cannot reach the server: ${error.message}`, true);
      return;
    }
    if (number !== searchNumber) return;
    if (!response.ok) {
      results.replaceChildren();
      setStatus(await errorText(response), true);
      return;
    }
    const data = await response.json();
    if (number !== searchNumber) return;
    render(data);
    const ms = Math.round(performance.now() - started);
    const count = data.results.length;
    setStatus(`${count} nearest image${count === 1 ? "" : "s"} to ${label} (${ms} ms)`);
  }

  function searchFile(file) {
    if (!file) return;
    showPreview(URL.createObjectURL(file));
    previewUrl = preview.src;
    const form = new FormData();
    form.append("file", file, file.name);
    search(file.name, () => fetch(`/api/query?k=${neighbours()}`, { method: "POST", body: form }));
  }

  function searchSimilar(sha1) {
    if (!sha1) return;
    showPreview(`/thumbnails/${sha1}`);
    const url = `/api/similar?id=${encodeURIComponent(sha1)}&n=${neighbours()}`;
    search(sha1.slice(0, 10) + "…", () => fetch(url));
  }

  fileInput.addEventListener("change", () => {
    searchFile(fileInput.files[0]);
    fileInput.value = ""; // choosing the same file again searches again
  });

  results.addEventListener("click", (event) => {
    const figure = event.target.closest("figure.result");
    if (figure) searchSimilar(figure.dataset.sha1);
  });
  results.addEventListener("keydown", (event) => {
    const figure = event.target.closest("figure.result");
    if (figure && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      searchSimilar(figure.dataset.sha1);
    }
  });

  // A file dropped anywhere is searched, never opened by the browser in place of the page.
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth += 1;
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) drop.classList.remove("over");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    drop.classList.remove("over");
    const files = event.dataTransfer ? event.dataTransfer.files : null;
    if (files && files.length) {
      searchFile(files[0]);
    } else {
      setStatus("Drop an image file (JPEG, PNG, GIF, BMP, WebP or TIFF).", true);
    }
  });
})();
