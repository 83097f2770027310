// A small time-series line chart on a canvas: a time window ending at the newest point (growing with the data
// from `minWindow` up to `window`), one line per series, a y axis
// scaled to the data (or fixed), grid lines with labels, and shaded bands (time ranges to point out, such as
// the part of a line that was back-filled from history after a drop). Redraws itself when resized.

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{series: {label: string, color: string}[], format?: (v: number) => string, max?: number,
   *          window?: number, minWindow?: number, gapAfter?: number}} options  window: the most ms shown;
   *          minWindow: the least; gapAfter: ms between two points beyond which the line is broken
   */
  constructor(canvas, options) {
    this.canvas = canvas;
    this.opts = { format: (v) => String(Math.round(v)), window: 5 * 60_000, minWindow: 60_000, gapAfter: 10_000, ...options };
    this.points = []; // {t, values: number[]}
    this.bands = []; // {from, to}
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  set(points, bands = []) {
    this.points = points;
    this.bands = bands;
    this.draw();
  }

  draw() {
    const { canvas, opts } = this;
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const g = canvas.getContext('2d');
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);

    // The window ends at the newest figure (the publisher's clock, not this browser's).
    const end = this.points.length ? this.points.at(-1).t : Date.now();
    const span = this.points.length ? end - this.points[0].t : 0;
    const windowMs = Math.min(opts.window, Math.max(opts.minWindow, span));
    const start = end - windowMs;
    const shown = this.points.filter((p) => p.t >= start);
    canvas.dataset.points = String(shown.length);

    let top = opts.max;
    if (top === undefined) {
      top = 0;
      for (const p of shown) for (const v of p.values) top = Math.max(top, v);
      top = niceCeil(top || 1);
    }

    g.font = '11px system-ui, sans-serif';
    const left = Math.ceil(g.measureText(opts.format(top)).width) + 8, right = 6, upper = 6, lower = 18;
    const x = (t) => left + ((t - start) / windowMs) * (w - left - right);
    const y = (v) => upper + (1 - v / top) * (h - upper - lower);

    // Bands first, under everything.
    g.fillStyle = 'rgba(245, 158, 11, 0.14)';
    for (const b of this.bands) {
      const x0 = Math.max(left, x(b.from)), x1 = Math.min(w - right, x(b.to));
      if (x1 > x0) g.fillRect(x0, upper, Math.max(1, x1 - x0), h - upper - lower);
    }

    // Grid and labels: four horizontal lines, about five time marks.
    g.strokeStyle = '#e5e7eb'; g.fillStyle = '#6b7280'; g.lineWidth = 1;
    g.textBaseline = 'middle'; g.textAlign = 'right';
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4, yy = Math.round(y(v)) + 0.5;
      g.beginPath(); g.moveTo(left, yy); g.lineTo(w - right, yy); g.stroke();
      g.fillText(opts.format(v), left - 4, yy);
    }
    g.textBaseline = 'alphabetic'; g.textAlign = 'center';
    const step = [5, 10, 15, 30, 60, 120, 300, 600].map((s) => s * 1000).find((s) => windowMs / s <= 6) ?? 600_000;
    const clock = step < 60_000 ? { hour: '2-digit', minute: '2-digit', second: '2-digit' } : { hour: '2-digit', minute: '2-digit' };
    const labelWidth = g.measureText(new Date(end).toLocaleTimeString([], clock)).width + 12;
    let lastLabel = -Infinity;
    for (let t = Math.ceil(start / step) * step; t <= end; t += step) {
      const xx = Math.round(x(t)) + 0.5;
      g.beginPath(); g.moveTo(xx, upper); g.lineTo(xx, h - lower); g.stroke();
      // Labels that fit: inside the plot, not over the previous one.
      if (xx - labelWidth / 2 >= left && xx + labelWidth / 2 <= w && xx - lastLabel >= labelWidth) {
        g.fillText(new Date(t).toLocaleTimeString([], clock), xx, h - 4);
        lastLabel = xx;
      }
    }

    // One line per series, broken where figures are missing.
    g.lineWidth = 1.6; g.lineJoin = 'round';
    opts.series.forEach((s, i) => {
      g.strokeStyle = s.color;
      g.beginPath();
      let prev = null;
      for (const p of shown) {
        const px = x(p.t), py = y(p.values[i]);
        if (prev && p.t - prev.t <= opts.gapAfter) g.lineTo(px, py); else g.moveTo(px, py);
        prev = p;
      }
      g.stroke();
    });
  }
}

/** 1, 2, 4 or 8 times a power of ten, at least `v` (its quarters are round numbers too). */
function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 4, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
