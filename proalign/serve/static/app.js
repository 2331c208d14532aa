// The page's behaviour. Every text from the server or the user is set with textContent, never
// parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let tower = "llm";

async function call(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function status(id, text, isError) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", Boolean(isError));
}

function figures(container, hits) {
  container.replaceChildren(...hits.map((hit, rank) => {
    const figure = document.createElement("figure");
    figure.className = "hit";
    figure.dataset.path = hit.path;
    figure.dataset.score = hit.score;
    const image = document.createElement("img");
    image.src = hit.url;
    image.alt = hit.path;
    const caption = document.createElement("figcaption");
    caption.textContent = `${rank + 1}. ${hit.path} (${hit.score.toFixed(3)})`;
    figure.append(image, caption);
    return figure;
  }));
}

async function textSearch(event) {
  event.preventDefault();
  const q = $("query").value;
  status("text-status", "searching…");
  try {
    const params = new URLSearchParams({ q, k: $("top-k").value, tower });
    const result = await call(`/api/search?${params}`);
    figures($("results"), result.hits);
    status("text-status", `${result.hits.length} images for “${result.query}” (${result.tower} tower)`);
  } catch (error) {
    $("results").replaceChildren();
    status("text-status", error.message, true);
  }
}

async function imageSearch(file) {
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  status("image-status", "searching…");
  try {
    const params = new URLSearchParams({ k: $("top-k").value, tower, labels: $("labels").value });
    const result = await call(`/api/image?${params}`, { method: "POST", body: file });
    figures($("neighbours"), result.neighbours);
    $("label-results").replaceChildren(...result.labels.map((item) => {
      const entry = document.createElement("li");
      entry.className = "label";
      entry.dataset.label = item.label;
      entry.textContent = `${item.label}: ${(100 * item.probability).toFixed(1)} % (cosine ${item.score.toFixed(3)})`;
      return entry;
    }));
    status("image-status", `${result.neighbours.length} nearest images` +
      (result.labels.length ? `; best label: ${result.labels[0].label}` : ""));
  } catch (error) {
    $("neighbours").replaceChildren();
    $("label-results").replaceChildren();
    status("image-status", error.message, true);
  }
}

async function start() {
  $("text-form").addEventListener("submit", textSearch);
  $("upload").addEventListener("change", (event) => imageSearch(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    imageSearch(event.dataTransfer.files[0]);
  });
  try {
    const info = await call("/api/info");
    $("query").maxLength = info.max_query_chars;
    $("about").textContent = `${info.model} · ${info.images} images`;
    const names = { llm: "LLM tower", clip: "CLIP text tower" };
    for (const name of info.towers) {
      const label = document.createElement("label");
      const radio = document.createElement("input");
      Object.assign(radio, { type: "radio", name: "tower", value: name, id: `tower-${name}` });
      radio.checked = name === info.towers[0];
      radio.addEventListener("change", () => { tower = name; });
      label.append(radio, ` ${names[name] || name}`);
      $("towers").append(label);
    }
    tower = info.towers[0];
    document.body.dataset.ready = "true";
  } catch (error) {
    $("about").textContent = `cannot reach the server: ${error.message}`;
  }
}

start();
