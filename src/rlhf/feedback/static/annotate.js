"use strict";
// The annotator page. Model text is untrusted: it only ever reaches the page through textContent / value.
const $ = (id) => document.getElementById(id);
const list = $("responses");
const batchParam = new URLSearchParams(window.location.search).get("batch");
let item = null;
let saveTimer = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function cards() {
  return Array.from(list.children);
}

// Ranks from the order of the cards (best first); a card marked "tie" shares the rank of the card above.
function ranking() {
  const ranks = new Array(item.responses.length);
  const ties = [];
  let rank = 0;
  let group = null;
  cards().forEach((card, position) => {
    const tied = position > 0 && card.querySelector(".tie input").checked;
    const index = Number(card.dataset.index);
    if (tied) {
      if (!group) {
        group = [Number(cards()[position - 1].dataset.index)];
        ties.push(group);
      }
      group.push(index);
    } else {
      rank += 1;
      group = null;
    }
    ranks[index] = rank;
  });
  return { ranks, ties };
}

function showRanks() {
  const { ranks } = ranking();
  cards().forEach((card, position) => {
    card.querySelector(".rank").textContent = "#" + ranks[Number(card.dataset.index)];
    card.querySelector(".tie input").disabled = position === 0;
    if (position === 0) card.querySelector(".tie input").checked = false;
  });
}

function feedback() {
  const out = {};
  const forms = item.forms;
  if (forms.includes("ranking")) Object.assign(out, ranking());
  if (forms.includes("rating")) {
    out.ratings = item.responses.map((_, i) => {
      const value = list.querySelector(`[data-index="${i}"] .rating select`).value;
      return value ? Number(value) : null;
    });
  }
  if (forms.includes("pairwise")) {
    const chosen = document.querySelector('input[name="pairwise"]:checked');
    if (chosen) out.pairwise = chosen.value;
  }
  if (forms.includes("correction")) {
    const edited = cards().find((card) => card.classList.contains("editing"));
    if (edited) {
      out.correction = { index: Number(edited.dataset.index), text: edited.querySelector("textarea").value };
    }
  }
  if (forms.includes("demonstration") && $("demonstration").value.trim()) out.demonstration = $("demonstration").value;
  if (forms.includes("critique") && $("critique").value.trim()) out.critique = $("critique").value;
  out.flags = Array.from($("flags").querySelectorAll("input:checked")).map((box) => box.value);
  return out;
}

function changed() {
  showRanks();
  $("save-state").textContent = "unsaved changes";
  clearTimeout(saveTimer);
  saveTimer = setTimeout(saveDraft, 700);
}

async function saveDraft() {
  if (!item) return;
  const itemId = item.id;
  try {
    await api("PUT", `/api/items/${itemId}/draft`, feedback());
    if (item && item.id === itemId) $("save-state").textContent = "draft saved";
  } catch (e) {
    $("save-state").textContent = "draft not saved: " + e.message;
  }
}

function move(card, step) {
  const sibling = step < 0 ? card.previousElementSibling : card.nextElementSibling;
  if (!sibling) return;
  if (step < 0) list.insertBefore(card, sibling);
  else list.insertBefore(sibling, card);
  card.focus();
  changed();
}

function makeCard(text, index) {
  const card = el("li", "card");
  card.dataset.index = String(index);
  card.tabIndex = 0;
  card.draggable = true;
  card.setAttribute("aria-label", `response ${index + 1}`);
  const head = el("div", "card-head");
  head.append(el("span", "handle", "⠿"), el("span", "rank", ""), el("span", "label", `response ${index + 1}`));
  if (item.forms.includes("pairwise") && item.pair.includes(index)) {
    head.append(el("span", "pair-badge", item.pair[0] === index ? "A" : "B"));
  }
  const tie = el("label", "tie");
  const tieBox = el("input");
  tieBox.type = "checkbox";
  tieBox.addEventListener("change", changed);
  tie.append(tieBox, document.createTextNode(" tie with above"));
  tie.hidden = !item.forms.includes("ranking");
  head.append(tie);
  card.append(head, el("div", "text", text));
  if (item.forms.includes("rating")) {
    const rating = el("label", "rating", "rating ");
    const select = el("select");
    select.append(el("option", "", "–"));
    select.firstChild.value = "";
    for (let r = 1; r <= item.rating_scale; r += 1) select.append(el("option", "", String(r)));
    select.addEventListener("change", changed);
    rating.append(select, document.createTextNode(` / ${item.rating_scale}`));
    card.append(rating);
  }
  if (item.forms.includes("correction")) {
    const edit = el("button", "edit", "edit (correct this response)");
    edit.type = "button";
    const area = el("textarea");
    area.rows = 4;
    area.maxLength = 20000;
    area.hidden = true;
    area.addEventListener("input", changed);
    edit.addEventListener("click", () => {
      cards().forEach((other) => {
        if (other !== card && other.classList.contains("editing")) {
          other.classList.remove("editing");
          other.querySelector("textarea").hidden = true;
        }
      });
      const editing = card.classList.toggle("editing");
      area.hidden = !editing;
      if (editing && !area.value) area.value = text;
      changed();
    });
    card.append(edit, area);
  }
  card.addEventListener("keydown", (event) => {
    if (event.target !== card) return;
    if (event.key === "ArrowUp") move(card, -1);
    else if (event.key === "ArrowDown") move(card, 1);
    else if (event.key === "t" || event.key === "T") {
      if (card.previousElementSibling) {
        tieBox.checked = !tieBox.checked;
        changed();
      }
    } else return;
    event.preventDefault();
  });
  card.addEventListener("dragstart", (event) => {
    card.classList.add("dragging");
    event.dataTransfer.effectAllowed = "move";
    event.dataTransfer.setData("text/plain", card.dataset.index);
  });
  card.addEventListener("dragend", () => {
    card.classList.remove("dragging");
    changed();
  });
  return card;
}

list.addEventListener("dragover", (event) => {
  const dragging = list.querySelector(".dragging");
  if (!dragging) return;
  event.preventDefault();
  const after = cards().find((card) => {
    if (card === dragging) return false;
    const box = card.getBoundingClientRect();
    return event.clientY < box.top + box.height / 2;
  });
  if (after) list.insertBefore(dragging, after);
  else list.append(dragging);
});
list.addEventListener("drop", (event) => event.preventDefault());

function restore(saved) {
  if (saved.ranks && saved.ranks.length === item.responses.length && saved.ranks.every((r) => r)) {
    const order = item.responses.map((_, i) => i).sort((a, b) => saved.ranks[a] - saved.ranks[b] || a - b);
    order.forEach((i) => list.append(list.querySelector(`[data-index="${i}"]`)));
    (saved.ties || []).forEach((group) => {
      const positions = group.map((i) => cards().indexOf(list.querySelector(`[data-index="${i}"]`)));
      const first = Math.min(...positions);
      cards().forEach((card, position) => {
        if (positions.includes(position) && position !== first) card.querySelector(".tie input").checked = true;
      });
    });
  }
  (saved.ratings || []).forEach((value, i) => {
    if (value) list.querySelector(`[data-index="${i}"] .rating select`).value = String(value);
  });
  if (saved.pairwise) document.querySelector(`input[name="pairwise"][value="${saved.pairwise}"]`).checked = true;
  if (saved.correction) {
    const card = list.querySelector(`[data-index="${saved.correction.index}"]`);
    card.classList.add("editing");
    card.querySelector("textarea").hidden = false;
    card.querySelector("textarea").value = saved.correction.text;
  }
  $("demonstration").value = saved.demonstration || "";
  $("critique").value = saved.critique || "";
  $("flags").querySelectorAll("input").forEach((box) => {
    box.checked = (saved.flags || []).includes(box.value);
  });
}

function render(next) {
  clearTimeout(saveTimer);
  item = next;
  $("loading").hidden = true;
  $("error").textContent = "";
  if (!item) {
    $("item").hidden = true;
    $("done").hidden = false;
    return;
  }
  $("done").hidden = true;
  $("batch").textContent = item.batch;
  $("prompt-id").textContent = item.prompt_id;
  $("prompt").textContent = item.prompt;
  $("save-state").textContent = item.annotation.status === "draft" ? "draft" : item.annotation.status;
  $("ranking-help").hidden = !item.forms.includes("ranking");
  $("pairwise-box").hidden = !item.forms.includes("pairwise");
  $("demonstration-box").hidden = !item.forms.includes("demonstration");
  $("critique-box").hidden = !item.forms.includes("critique");
  document.querySelectorAll('input[name="pairwise"]').forEach((box) => {
    box.checked = false;
  });
  $("pair-a").textContent = `A (response ${item.pair[0] + 1})`;
  $("pair-b").textContent = `B (response ${item.pair[1] + 1})`;
  list.replaceChildren(...item.responses.map((text, i) => makeCard(text, i)));
  restore(item.annotation.feedback || {});
  showRanks();
  $("item").hidden = false;
  window.scrollTo(0, 0);
}

// A submit is retried with the SAME submission id until the server answers, so it is stored exactly once.
async function send(body) {
  const key = `rlhf-submission-${item.id}`;
  let id = window.localStorage.getItem(key);
  if (!id) {
    id = window.crypto.randomUUID();
    window.localStorage.setItem(key, id);
  }
  const url = `/api/items/${item.id}/submit` + (batchParam ? `?batch=${encodeURIComponent(batchParam)}` : "");
  clearTimeout(saveTimer);
  $("submit").disabled = $("skip").disabled = true;
  $("error").textContent = "";
  try {
    for (let attempt = 0; ; attempt += 1) {
      try {
        const result = await api("POST", url, { ...body, submission_id: id });
        window.localStorage.removeItem(key);
        render(result.next);
        return;
      } catch (e) {
        if ((e.status && e.status < 500) || attempt >= 5) throw e;
        await new Promise((resolve) => setTimeout(resolve, 300 * 2 ** attempt));
      }
    }
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    $("submit").disabled = $("skip").disabled = false;
  }
}

$("submit").addEventListener("click", () => send(feedback()));
$("skip").addEventListener("click", () => {
  const flags = Array.from($("flags").querySelectorAll("input:checked")).map((box) => box.value);
  send({ skip: true, flags });
});
["demonstration", "critique"].forEach((id) => $(id).addEventListener("input", changed));
$("flags").addEventListener("change", changed);
document.querySelectorAll('input[name="pairwise"]').forEach((box) => box.addEventListener("change", changed));

(async () => {
  try {
    const query = batchParam ? `?batch=${encodeURIComponent(batchParam)}` : "";
    render((await api("GET", "/api/next" + query)).item);
  } catch (e) {
    $("loading").textContent = "Could not load an item: " + e.message;
  }
})();
