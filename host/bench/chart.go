package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
)

// ChartFormat selects WriteChart's output.
type ChartFormat int

const (
	// ChartSVG is a standalone SVG image.
	ChartSVG ChartFormat = iota
	// ChartHTML is an HTML page holding the SVG and a table of the figures.
	ChartHTML
)

// Chart geometry, in SVG user units.
const (
	chartW      = 960
	chartH      = 540
	plotLeft    = 80
	plotRight   = 700
	plotTop     = 60
	plotBottom  = 470
	legendLeft  = 720
	legendTop   = 70
	legendLineH = 84
)

var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"}

// WriteChart draws the latency percentile curves of results on one chart:
// x is the percentile on a "nines" scale (50%, 90%, 99%, 99.9% ... evenly
// spaced), y the latency on a log scale, one curve per result, with a
// legend of each result's throughput and p50/p99. The output is
// self-contained (no scripts, fonts or links).
func WriteChart(w io.Writer, title string, results []*Result, f ChartFormat) error {
	svg := chartSVG(title, results)
	if f == ChartSVG {
		_, err := io.WriteString(w, svg)
		return err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>%s</title>\n", html.EscapeString(title))
	b.WriteString("<style>body{font-family:sans-serif;margin:24px}table{border-collapse:collapse;margin-top:16px}" +
		"td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}</style></head><body>\n")
	b.WriteString(svg)
	b.WriteString("\n<table><tr><th>target</th><th>calls/s</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>calls</th><th>errors</th></tr>\n")
	for _, r := range results {
		fmt.Fprintf(&b, "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>\n",
			html.EscapeString(r.Name), formatCount(r.RPS), fmtUS(r.Latency.P50), fmtUS(r.Latency.P90), fmtUS(r.Latency.P99),
			fmtUS(r.Latency.P999), fmtUS(r.Latency.Max), formatCount(float64(r.Requests)), formatCount(float64(r.errorCount())))
	}
	b.WriteString("</table>\n")
	if len(results) > 0 {
		fmt.Fprintf(&b, "<p>%s; %s</p>\n", html.EscapeString(results[0].Workload), html.EscapeString(results[0].Load))
	}
	b.WriteString("</body></html>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// nines maps a percentile to the chart's x: log10(1/(1-q)).
func nines(p float64) float64 {
	if p >= 100 {
		return math.Inf(1)
	}
	return -math.Log10(1 - p/100)
}

func chartSVG(title string, results []*Result) string {
	// X range: up to the highest percentile any curve reaches (its max
	// point is drawn at log10(count), where one call in count lies).
	maxX := 2.0
	lo, hi := math.Inf(1), 0.0
	for _, r := range results {
		if n := r.Latency.Count; n > 0 {
			maxX = max(maxX, math.Ceil(math.Log10(float64(n))))
		}
		for _, p := range r.Curve {
			if p.Latency > 0 {
				lo, hi = min(lo, p.Latency), max(hi, p.Latency)
			}
		}
	}
	maxX = min(maxX, 6)
	if hi == 0 {
		lo, hi = 1, 1000
	}
	// Y range: whole 1-2-5 steps around the data, on a log scale.
	yLo := niceFloor(lo)
	yHi := niceCeil(hi)
	if yHi <= yLo {
		yHi = yLo * 10
	}
	lyLo, lyHi := math.Log10(yLo), math.Log10(yHi)
	xOf := func(x float64) float64 { return plotLeft + (plotRight-plotLeft)*x/maxX }
	yOf := func(v float64) float64 {
		v = max(v, yLo)
		return plotBottom - (plotBottom-plotTop)*(math.Log10(v)-lyLo)/(lyHi-lyLo)
	}

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">`+"\n",
		chartW, chartH, chartW, chartH)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#ffffff"/>`+"\n", chartW, chartH)
	fmt.Fprintf(&b, `<text x="%d" y="28" font-size="16" font-weight="bold">%s</text>`+"\n", plotLeft, html.EscapeString(title))
	if len(results) > 0 {
		fmt.Fprintf(&b, `<text x="%d" y="46" fill="#555">%s</text>`+"\n", plotLeft, html.EscapeString(results[0].Workload+"; "+results[0].Load))
	}

	// Grid and axes.
	b.WriteString(`<g stroke="#e0e0e0" stroke-width="1">` + "\n")
	for _, v := range yTicks(yLo, yHi) {
		y := yOf(v)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>`+"\n", plotLeft, y, plotRight, y)
	}
	for x := 0.0; x <= maxX; x++ {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d"/>`+"\n", xOf(x), plotTop, xOf(x), plotBottom)
	}
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke-dasharray="3,3"/>`+"\n", xOf(nines(50)), plotTop, xOf(nines(50)), plotBottom)
	b.WriteString("</g>\n")
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#333"/>`+"\n", plotLeft, plotTop, plotRight-plotLeft, plotBottom-plotTop)
	for _, v := range yTicks(yLo, yHi) {
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", plotLeft-6, yOf(v), tickLabel(v))
	}
	xLabels := []string{"0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"}
	for x := 0; x <= int(maxX); x++ {
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", xOf(float64(x)), plotBottom+18, xLabels[x])
	}
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#777">50%%</text>`+"\n", xOf(nines(50)), plotBottom+18)
	fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">percentile (log scale of nines: each step is ten times rarer)</text>`+"\n", (plotLeft+plotRight)/2, plotBottom+44)
	fmt.Fprintf(&b, `<text transform="translate(18 %d) rotate(-90)" text-anchor="middle">latency (log scale)</text>`+"\n", (plotTop+plotBottom)/2)

	// Curves.
	for i, r := range results {
		color := palette[i%len(palette)]
		var pts []string
		for j, p := range r.Curve {
			x := nines(p.Percentile)
			if math.IsInf(x, 1) { // the maximum: one call in Count
				if j == 0 || r.Latency.Count == 0 {
					continue
				}
				x = math.Log10(float64(r.Latency.Count))
			}
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", xOf(min(x, maxX)), yOf(p.Latency)))
		}
		if len(pts) > 0 {
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2.2" stroke-linejoin="round" points="%s"/>`+"\n", color, strings.Join(pts, " "))
		}
		// Legend entry.
		y := legendTop + i*legendLineH
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="4"/>`+"\n", legendLeft, y, legendLeft+24, y, color)
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">%s</text>`+"\n", legendLeft+32, y+4, html.EscapeString(truncate(r.Name, 28)))
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#333">%s calls/s</text>`+"\n", legendLeft+32, y+20, formatCount(r.RPS))
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#333">p50 %s  p99 %s</text>`+"\n", legendLeft+32, y+36,
			fmtUS(r.Latency.P50), fmtUS(r.Latency.P99))
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#333">p99.9 %s  max %s</text>`+"\n", legendLeft+32, y+52,
			fmtUS(r.Latency.P999), fmtUS(r.Latency.Max))
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// tickLabel renders a 1-2-5 step in microseconds compactly: 500µs, 2ms, 1s.
func tickLabel(v float64) string {
	switch {
	case v < 1000:
		return fmt.Sprintf("%gµs", v)
	case v < 1e6:
		return fmt.Sprintf("%gms", v/1e3)
	default:
		return fmt.Sprintf("%gs", v/1e6)
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-1] + "…"
}

// niceFloor is the largest 1-2-5 step at or below v (v > 0).
func niceFloor(v float64) float64 {
	e := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{5, 2, 1} {
		if m*e <= v {
			return m * e
		}
	}
	return e
}

// niceCeil is the smallest 1-2-5 step at or above v (v > 0).
func niceCeil(v float64) float64 {
	e := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*e >= v {
			return m * e
		}
	}
	return 10 * e
}

// yTicks lists the 1-2-5 steps from lo to hi; only powers of ten when the
// range spans many decades.
func yTicks(lo, hi float64) []float64 {
	mults := []float64{1, 2, 5}
	if math.Log10(hi/lo) > 4 {
		mults = []float64{1}
	}
	var out []float64
	for e := math.Pow(10, math.Floor(math.Log10(lo))); e <= hi; e *= 10 {
		for _, m := range mults {
			v := m * e
			if v >= lo*0.999 && v <= hi*1.001 {
				out = append(out, v)
			}
		}
	}
	return out
}
