"""The layout editor: one box per person on a stage of the output's aspect ratio, moved and resized by dragging.

A `gr.HTML` whose value is the layout itself, `{"width": W, "height": H, "boxes": [[y0, x0, y1, x1], ...]}` with
boxes in image fractions (the pipeline's `Person.box`). The page's script writes the dragged boxes back into the
value, so an event that takes this component as input receives the layout as the user left it.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from dynamicid.infer.outputs import PERSON_COLORS
from dynamicid.infer.people import default_boxes

CSS_COLORS = ["#{:02x}{:02x}{:02x}".format(*color) for color in PERSON_COLORS]

# A JS template literal over the props `value` and `colors` (gr.HTML renders it and patches the DOM on change).
TEMPLATE = """
<div class="layout-stage"
     style="aspect-ratio: ${value.width} / ${value.height}; width: min(100%, ${360 * value.width / value.height}px)">
${value.boxes.map((b, i) => `
  <div class="layout-box" data-index="${i}" title="Person ${i + 1}: drag to move, drag a corner to resize"
       style="top:${b[0] * 100}%;left:${b[1] * 100}%;height:${(b[2] - b[0]) * 100}%;width:${(b[3] - b[1]) * 100}%;
              border-color:${colors[i % colors.length]};background:${colors[i % colors.length]}33">
    <span class="layout-tag" style="background:${colors[i % colors.length]}">${i + 1}</span>
    ${['tl', 'tr', 'bl', 'br'].map((c) => `<div class="layout-handle ${c}" data-index="${i}" data-corner="${c}"
      style="background:${colors[i % colors.length]}"></div>`).join('')}
  </div>`).join('')}
</div>
<div class="layout-legend">${value.width} x ${value.height} px &middot; boxes as y0, x0, y1, x1 &middot;
  ${value.boxes.map((b, i) =>
  `<span class="layout-coords" data-index="${i}" style="color:${colors[i % colors.length]}">person ${i + 1}:
   ${b.map((v) => v.toFixed(2)).join(', ')}</span>`).join(' &middot; ')}</div>
"""

CSS = """
.layout-stage { position: relative; margin: 0 auto; background: #f3f4f6;
  background-image: linear-gradient(#e5e7eb 1px, transparent 1px), linear-gradient(90deg, #e5e7eb 1px, transparent 1px);
  background-size: 10% 10%; border: 1px solid #9ca3af; touch-action: none; user-select: none; }
.layout-box { position: absolute; box-sizing: border-box; border: 2px solid; cursor: move; }
.layout-tag { position: absolute; left: 2px; top: 2px; color: white; font: bold 12px sans-serif; padding: 0 4px;
  border-radius: 3px; pointer-events: none; }
.layout-handle { position: absolute; width: 12px; height: 12px; border: 1px solid white; box-sizing: border-box; }
.layout-handle.tl { left: -6px; top: -6px; cursor: nwse-resize; }
.layout-handle.tr { right: -6px; top: -6px; cursor: nesw-resize; }
.layout-handle.bl { left: -6px; bottom: -6px; cursor: nesw-resize; }
.layout-handle.br { right: -6px; bottom: -6px; cursor: nwse-resize; }
.layout-legend { font-size: 12px; margin-top: 4px; text-align: center; }
"""

# Dragging a box moves it inside the stage; dragging a corner moves that corner (a box may shrink to nothing,
# which the pipeline then refuses with a message). Coordinates are kept to 3 decimals.
SCRIPT = """
let drag = null;
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
const round = (v) => Math.round(v * 1000) / 1000;
element.addEventListener('pointerdown', (event) => {
  const target = event.target.closest('[data-index]');
  const stage = element.querySelector('.layout-stage');
  if (!target || !stage || !stage.contains(target)) return;
  event.preventDefault();
  const index = Number(target.dataset.index);
  drag = { index, corner: target.dataset.corner || '', x: event.clientX, y: event.clientY,
           rect: stage.getBoundingClientRect(), box: props.value.boxes[index].slice() };
});
window.addEventListener('pointermove', (event) => {
  if (!drag) return;
  const dy = (event.clientY - drag.y) / drag.rect.height;
  const dx = (event.clientX - drag.x) / drag.rect.width;
  let [y0, x0, y1, x1] = drag.box;
  if (!drag.corner) {
    const h = y1 - y0, w = x1 - x0;
    y0 = clamp(y0 + dy, 0, 1 - h); x0 = clamp(x0 + dx, 0, 1 - w); y1 = y0 + h; x1 = x0 + w;
  } else {
    if (drag.corner[0] === 't') y0 = clamp(y0 + dy, 0, y1); else y1 = clamp(y1 + dy, y0, 1);
    if (drag.corner[1] === 'l') x0 = clamp(x0 + dx, 0, x1); else x1 = clamp(x1 + dx, x0, 1);
  }
  const boxes = props.value.boxes.map((b) => b.slice());
  boxes[drag.index] = [y0, x0, y1, x1].map(round);
  props.value = { ...props.value, boxes };
});
window.addEventListener('pointerup', () => {
  if (drag) { drag = null; trigger('change'); }
});
"""


def layout_value(width: int, height: int, num_people: int, boxes: list[list[float]] | None = None) -> dict[str, Any]:
    """The editor's value; equal vertical strips unless `boxes` (one per person) are given."""
    if boxes is None or len(boxes) != num_people:
        boxes = [list(box) for box in default_boxes(num_people)]
    return {"width": int(width), "height": int(height), "boxes": [list(map(float, box)) for box in boxes]}


def layout_editor(value: dict[str, Any], **kwargs: Any) -> gr.HTML:
    return gr.HTML(
        value,
        html_template=TEMPLATE,
        css_template=CSS,
        js_on_load=SCRIPT,
        colors=CSS_COLORS,
        **kwargs,
    )
