package bench

import (
	"math"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Histogram range: 1 ns to 1 minute with 3 significant digits, so every
// recorded latency keeps 0.1% precision; slower calls are clamped to the
// top (a call can last at most CallTimeout anyway). One histogram is about
// 200 KiB, so workers share a few (see shards) instead of having one each.
const (
	histLowest  = 1
	histHighest = int64(time.Minute)
	histDigits  = 3
)

func newHistogram() *hdrhistogram.Histogram {
	return hdrhistogram.New(histLowest, histHighest, histDigits)
}

func record(h *hdrhistogram.Histogram, d time.Duration) {
	v := int64(d)
	if v < histLowest {
		v = histLowest
	}
	if v > histHighest {
		v = histHighest
	}
	_ = h.RecordValue(v) // cannot fail: v is within the histogram's range
}

// Latency summarises a latency histogram: Count is the number of calls
// recorded; every other field is in microseconds (P999 is p99.9).
type Latency struct {
	Count  int64   `json:"count"`
	Min    float64 `json:"min_us"`
	Mean   float64 `json:"mean_us"`
	StdDev float64 `json:"stddev_us"`
	P50    float64 `json:"p50_us"`
	P90    float64 `json:"p90_us"`
	P99    float64 `json:"p99_us"`
	P999   float64 `json:"p99_9_us"`
	Max    float64 `json:"max_us"`
}

func us(ns float64) float64 { return ns / 1e3 }

// summarize reads the percentiles the reports show. An empty histogram
// gives a zero Latency.
func summarize(h *hdrhistogram.Histogram) Latency {
	if h == nil || h.TotalCount() == 0 {
		return Latency{}
	}
	return Latency{
		Count:  h.TotalCount(),
		Min:    us(float64(h.Min())),
		Mean:   us(h.Mean()),
		StdDev: us(h.StdDev()),
		P50:    us(float64(h.ValueAtQuantile(50))),
		P90:    us(float64(h.ValueAtQuantile(90))),
		P99:    us(float64(h.ValueAtQuantile(99))),
		P999:   us(float64(h.ValueAtQuantile(99.9))),
		Max:    us(float64(h.Max())),
	}
}

// Point is one point of a percentile curve: the latency at Percentile.
type Point struct {
	Percentile float64 `json:"percentile"`
	Latency    float64 `json:"latency_us"`
}

// curve samples the percentile distribution for charts, evenly on the
// "nines" scale (x = log10(1/(1-q))) from the minimum to the highest
// percentile the sample size supports (one call in count), so a curve never
// claims a p99.99 it did not measure. The last point is the maximum.
func curve(h *hdrhistogram.Histogram) []Point {
	if h == nil {
		return nil
	}
	n := h.TotalCount()
	if n == 0 {
		return nil
	}
	maxNines := math.Log10(float64(n))
	const step = 0.05
	var pts []Point
	for x := 0.0; x < maxNines && x <= 6; x += step {
		q := 100 * (1 - math.Pow(10, -x))
		pts = append(pts, Point{Percentile: q, Latency: us(float64(h.ValueAtQuantile(q)))})
	}
	return append(pts, Point{Percentile: 100, Latency: us(float64(h.Max()))})
}
