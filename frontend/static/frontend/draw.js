// A drawing pad on a <canvas>: mouse, pen or finger; dark ink on a white square.

const INK = "#111827";
const STROKE = 20; // pixels on the 280-pixel pad: about what a finger or a thick pen draws

export class DrawingPad {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.drawing = false;
    this.strokes = 0;
    this.clear();
    canvas.addEventListener("pointerdown", (e) => this.start(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointerleave", "pointercancel"]) canvas.addEventListener(name, () => this.end());
  }

  clear() {
    const { ctx, canvas } = this;
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    this.strokes = 0;
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * (this.canvas.width / box.width),
            (event.clientY - box.top) * (this.canvas.height / box.height)];
  }

  start(event) {
    event.preventDefault();
    this.canvas.setPointerCapture?.(event.pointerId);
    this.drawing = true;
    this.strokes += 1;
    const [x, y] = this.point(event);
    const { ctx } = this;
    ctx.strokeStyle = INK;
    ctx.fillStyle = INK;
    ctx.lineWidth = STROKE;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.arc(x, y, STROKE / 2, 0, Math.PI * 2);
    ctx.fill();
    ctx.beginPath();
    ctx.moveTo(x, y);
  }

  move(event) {
    if (!this.drawing) return;
    const [x, y] = this.point(event);
    this.ctx.lineTo(x, y);
    this.ctx.stroke();
  }

  end() {
    this.drawing = false;
  }

  toDataURL() {
    return this.canvas.toDataURL("image/png");
  }
}
