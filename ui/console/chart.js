// A small live line chart on a canvas: a fixed time window, a few series, the y axis scaled to what is
// shown, drawn sharp at any device pixel ratio and redrawn when its box changes size.

const COLORS = ['#2563eb', '#db2777', '#059669', '#d97706'];

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{series: string[], windowS?: number, unit?: string, integer?: boolean}} opts
   */
  constructor(canvas, { series, windowS = 120, unit = '', integer = false }) {
    this.canvas = canvas;
    this.series = series;
    this.windowS = windowS;
    this.unit = unit;
    this.integer = integer;
    this.points = []; // [{t, values: [...]}], oldest first
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(canvas);
  }

  /** Adds a point at time `t` (ms) and redraws. */
  push(t, values) {
    this.points.push({ t, values });
    const cutoff = t - this.windowS * 1000;
    while (this.points.length > 2 && this.points[0].t < cutoff) this.points.shift();
    this.draw();
  }

  /** Replaces every point (a chart created after data arrived). */
  load(points) {
    this.points = points.slice();
    this.draw();
  }

  dispose() {
    this.resize.disconnect();
  }

  draw() {
    const c = this.canvas;
    const w = c.clientWidth;
    const h = c.clientHeight;
    if (!w || !h) return;
    const dpr = window.devicePixelRatio || 1;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const styles = getComputedStyle(c);
    const ink = styles.getPropertyValue('--ink').trim() || '#222';
    const grid = styles.getPropertyValue('--grid').trim() || '#e5e7eb';
    g.font = '11px system-ui, sans-serif';

    const pts = this.points;
    const now = pts.length ? pts[pts.length - 1].t : Date.now();
    const t0 = now - this.windowS * 1000;
    let max = 0;
    for (const p of pts) for (const v of p.values) if (Number.isFinite(v)) max = Math.max(max, v);
    max = niceMax(max, this.integer);

    const label = (v) => formatNumber(v) + this.unit;
    const left = Math.max(28, g.measureText(label(max)).width + 10);
    const right = 8;
    const top = 30;
    const bottom = 18;
    const pw = Math.max(10, w - left - right);
    const ph = Math.max(10, h - top - bottom);
    const x = (t) => left + ((t - t0) / (this.windowS * 1000)) * pw;
    const y = (v) => top + ph - (v / max) * ph;

    // Grid and y labels.
    g.strokeStyle = grid;
    g.fillStyle = ink;
    g.lineWidth = 1;
    g.textBaseline = 'middle';
    g.textAlign = 'right';
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      g.beginPath();
      g.moveTo(left, yy);
      g.lineTo(left + pw, yy);
      g.stroke();
      if (i % 2 === 0) g.fillText(label(v), left - 4, yy);
    }
    g.textAlign = 'left';
    g.textBaseline = 'alphabetic';
    g.fillText(`-${this.windowS}s`, left, h - 4);
    g.textAlign = 'right';
    g.fillText('now', left + pw, h - 4);

    // Legend, with the latest values.
    g.textAlign = 'left';
    g.textBaseline = 'middle';
    let lx = left;
    const last = pts.length ? pts[pts.length - 1].values : [];
    this.series.forEach((name, i) => {
      const text = `${name}${last[i] !== undefined ? ': ' + formatNumber(last[i]) + this.unit : ''}`;
      g.fillStyle = COLORS[i % COLORS.length];
      g.fillRect(lx, 7, 10, 10);
      g.fillStyle = ink;
      g.fillText(text, lx + 14, 12);
      lx += g.measureText(text).width + 28;
    });

    // Series.
    g.save();
    g.beginPath();
    g.rect(left, top - 1, pw, ph + 2);
    g.clip();
    // The first series widest and drawn first, so that equal series still show both colours.
    this.series.forEach((_, i) => {
      g.strokeStyle = COLORS[i % COLORS.length];
      g.lineWidth = Math.max(1.5, 3.5 - i * 1.5);
      g.lineJoin = 'round';
      g.beginPath();
      let started = false;
      for (const p of pts) {
        const v = p.values[i];
        if (!Number.isFinite(v)) continue;
        if (!started) { g.moveTo(x(p.t), y(v)); started = true; } else g.lineTo(x(p.t), y(v));
      }
      g.stroke();
    });
    g.restore();
  }
}

/** A round axis maximum at or above `v` (at least 1, or 4 for integers so that quarter lines are whole). */
function niceMax(v, integer) {
  if (v <= 0) return integer ? 4 : 1;
  const exp = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) {
    const candidate = m * exp;
    if (candidate >= v && (!integer || Number.isInteger(candidate / 4))) return candidate;
  }
  return integer ? Math.ceil(v / 4) * 4 : 10 * exp;
}

export function formatNumber(v) {
  if (!Number.isFinite(v)) return '–';
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + 'G';
  if (a >= 1e6) return (v / 1e6).toFixed(1) + 'M';
  if (a >= 1e4) return (v / 1e3).toFixed(1) + 'k';
  if (a >= 100 || Number.isInteger(v)) return String(Math.round(v));
  return v.toFixed(1);
}
