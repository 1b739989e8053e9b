package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// ConfigReport is the load shape as the JSON report records it.
type ConfigReport struct {
	Connections  int     `json:"connections"`
	Concurrency  int     `json:"concurrency"`
	Duration     string  `json:"duration,omitempty"`
	Requests     int64   `json:"requests,omitempty"`
	Warmup       string  `json:"warmup"`
	Rate         float64 `json:"rate"`
	ConnectEvery int     `json:"connect_every"`
	CallTimeout  string  `json:"call_timeout"`
}

func reportConfig(c Config) ConfigReport {
	r := ConfigReport{
		Connections:  c.Connections,
		Concurrency:  c.Concurrency,
		Requests:     c.Requests,
		Warmup:       c.Warmup.String(),
		Rate:         c.Rate,
		ConnectEvery: c.ConnectEvery,
		CallTimeout:  c.CallTimeout.String(),
	}
	if c.Duration > 0 {
		r.Duration = c.Duration.String()
	}
	return r
}

// Round is one round of a Compare for one target.
type Round struct {
	Round  int     `json:"round"`
	RPS    float64 `json:"rps"`
	P50    float64 `json:"p50_us"`
	P99    float64 `json:"p99_us"`
	Errors int64   `json:"errors"`
}

// Result is what one run (or, from Compare, every round of one target)
// measured. Latencies count successful calls only; failed calls are counted
// in Errors by status code.
type Result struct {
	// Name labels the target; Target is its address.
	Name   string `json:"name"`
	Target string `json:"target"`
	// Workload describes the calls; Load the load shape (Config.Shape).
	Workload string       `json:"workload"`
	Load     string       `json:"load"`
	Config   ConfigReport `json:"config"`
	// Start is when the measured part began (after warm-up).
	Start time.Time `json:"start"`
	// Elapsed is the measured wall time: from Start to the end of the last
	// measured call (summed over rounds in a Compare).
	Elapsed time.Duration `json:"-"`
	// Requests is the number of measured calls that completed, Successes
	// those that succeeded, Errors the others by status code.
	Requests  int64        `json:"requests"`
	Successes int64        `json:"successes"`
	Errors    []ErrorCount `json:"errors"`
	// RPS is Requests per second of Elapsed; SuccessRPS counts successes.
	RPS        float64 `json:"rps"`
	SuccessRPS float64 `json:"success_rps"`
	// ConnectionsOpened is how many connections the measured calls used.
	ConnectionsOpened int64 `json:"connections_opened"`
	// NotSent (open loop) is how many scheduled calls were never sent
	// because the target fell too far behind the rate; their latencies are
	// missing, so the percentiles understate.
	NotSent int64 `json:"not_sent"`
	// Latency is measured from each call's intended send time in the open
	// loop (coordinated omission corrected), from its send time in the
	// closed loop (where the two are the same).
	Latency Latency `json:"latency"`
	// Uncorrected (open loop only) is measured from the actual send time.
	Uncorrected *Latency `json:"latency_uncorrected,omitempty"`
	// Curve is the percentile distribution of Latency, for charts.
	Curve []Point `json:"percentile_curve"`
	// Processes are the watched processes' memory (Options.WatchPIDs).
	Processes []ProcessStat `json:"processes,omitempty"`
	// Rounds are the per-round figures of a Compare.
	Rounds []Round `json:"rounds,omitempty"`
	// Interrupted is set when the run was cut short.
	Interrupted bool `json:"interrupted,omitempty"`

	hist        *hdrhistogram.Histogram
	uncorrected *hdrhistogram.Histogram
}

// MarshalJSON adds elapsed_s to the default encoding.
func (r *Result) MarshalJSON() ([]byte, error) {
	type plain Result
	return json.Marshal(struct {
		*plain
		ElapsedSeconds float64 `json:"elapsed_s"`
	}{(*plain)(r), r.Elapsed.Seconds()})
}

// finish computes the derived figures from the counts and histograms.
func (r *Result) finish() {
	if s := r.Elapsed.Seconds(); s > 0 {
		r.RPS = float64(r.Requests) / s
		r.SuccessRPS = float64(r.Successes) / s
	}
	r.Latency = summarize(r.hist)
	r.Curve = curve(r.hist)
	if r.uncorrected != nil {
		u := summarize(r.uncorrected)
		r.Uncorrected = &u
	}
	if r.Errors == nil {
		r.Errors = []ErrorCount{}
	}
}

func (r *Result) errorCount() int64 { return r.Requests - r.Successes }

func mergeError(into map[string]*ErrorCount, e ErrorCount) {
	if have := into[e.Code]; have != nil {
		have.Count += e.Count
		return
	}
	c := e
	into[e.Code] = &c
}

// sortedErrors lists errors by count, most frequent first.
func sortedErrors(m map[string]*ErrorCount) []ErrorCount {
	out := make([]ErrorCount, 0, len(m))
	for _, e := range m {
		out = append(out, *e)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Count != out[j].Count {
			return out[i].Count > out[j].Count
		}
		return out[i].Code < out[j].Code
	})
	return out
}

// procAcc sums a process's figures over rounds.
type procAcc struct {
	ProcessStat
	calls float64
}

// merge combines the rounds of one target into one Result: counts, elapsed
// time and histograms add up; watched processes keep their peaks.
func merge(rounds []*Result) *Result {
	if len(rounds) == 0 {
		return nil
	}
	first := rounds[0]
	m := &Result{
		Name: first.Name, Target: first.Target, Workload: first.Workload, Load: first.Load,
		Config: first.Config, Start: first.Start, hist: newHistogram(),
	}
	if first.uncorrected != nil {
		m.uncorrected = newHistogram()
	}
	errs := map[string]*ErrorCount{}
	procs := map[int]*procAcc{}
	var order []int
	for i, r := range rounds {
		m.Elapsed += r.Elapsed
		m.Requests += r.Requests
		m.Successes += r.Successes
		m.ConnectionsOpened += r.ConnectionsOpened
		m.NotSent += r.NotSent
		m.Interrupted = m.Interrupted || r.Interrupted
		m.hist.Merge(r.hist)
		if m.uncorrected != nil && r.uncorrected != nil {
			m.uncorrected.Merge(r.uncorrected)
		}
		for _, e := range r.Errors {
			mergeError(errs, e)
		}
		for _, p := range r.Processes {
			if have := procs[p.PID]; have != nil {
				have.PeakRSS = max(have.PeakRSS, p.PeakRSS)
				have.HighWaterRSS = max(have.HighWaterRSS, p.HighWaterRSS)
				have.CPUSeconds += p.CPUSeconds
				if p.CPUPerCall > 0 {
					// calls of this round = its CPU over its per-call CPU
					have.calls += p.CPUSeconds * 1e6 / p.CPUPerCall
				}
				continue
			}
			c := procAcc{ProcessStat: p}
			if p.CPUPerCall > 0 {
				c.calls = p.CPUSeconds * 1e6 / p.CPUPerCall
			}
			procs[p.PID] = &c
			order = append(order, p.PID)
		}
		m.Rounds = append(m.Rounds, Round{Round: i + 1, RPS: r.RPS, P50: r.Latency.P50, P99: r.Latency.P99, Errors: r.errorCount()})
	}
	m.Errors = sortedErrors(errs)
	for _, pid := range order {
		p := procs[pid]
		if p.calls > 0 {
			p.CPUPerCall = p.CPUSeconds * 1e6 / p.calls
		}
		m.Processes = append(m.Processes, p.ProcessStat)
	}
	m.finish()
	return m
}

// WriteText writes a summary for a person.
func (r *Result) WriteText(w io.Writer) error {
	var b strings.Builder
	if r.Name != r.Target {
		fmt.Fprintf(&b, "%s: %s against %s\n", r.Name, r.Workload, r.Target)
	} else {
		fmt.Fprintf(&b, "%s against %s\n", r.Workload, r.Target)
	}
	fmt.Fprintf(&b, "  load:       %s\n", r.Load)
	fmt.Fprintf(&b, "  requests:   %s in %s (%s ok, %s failed)\n",
		formatCount(float64(r.Requests)), fmtDur(r.Elapsed), formatCount(float64(r.Successes)), formatCount(float64(r.errorCount())))
	fmt.Fprintf(&b, "  throughput: %s calls/s (%s successful/s)\n", formatCount(r.RPS), formatCount(r.SuccessRPS))
	if r.Config.ConnectEvery > 0 {
		fmt.Fprintf(&b, "  connections opened: %s\n", formatCount(float64(r.ConnectionsOpened)))
	}
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "  errors:     %s x %s (first: %s)\n", formatCount(float64(e.Count)), e.Code, e.Example)
	}
	if r.Uncorrected != nil {
		fmt.Fprintf(&b, "  latency from intended send time (coordinated omission corrected):\n    %s\n", r.Latency.String())
		fmt.Fprintf(&b, "  latency from actual send time (uncorrected):\n    %s\n", r.Uncorrected.String())
	} else {
		fmt.Fprintf(&b, "  latency:    %s\n", r.Latency.String())
	}
	if r.NotSent > 0 {
		fmt.Fprintf(&b, "  WARNING: %s scheduled calls were never sent: the target could not keep up with %s calls/s, so the latencies above understate\n",
			formatCount(float64(r.NotSent)), formatCount(r.Config.Rate))
	}
	for _, p := range r.Processes {
		fmt.Fprintf(&b, "  process %d (%s): peak RSS %s during the run, high-water RSS %s, CPU %.1fs = %s per call\n",
			p.PID, p.Name, fmtBytes(p.PeakRSS), fmtBytes(p.HighWaterRSS), p.CPUSeconds, fmtUS(p.CPUPerCall))
	}
	if len(r.Rounds) > 1 {
		b.WriteString("  rounds:    ")
		for _, rd := range r.Rounds {
			fmt.Fprintf(&b, " %s", formatCount(rd.RPS))
		}
		b.WriteString(" calls/s\n")
	}
	if r.Interrupted {
		b.WriteString("  (interrupted: partial results)\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// String renders the percentiles on one line.
func (l Latency) String() string {
	if l.Count == 0 {
		return "no successful calls"
	}
	return fmt.Sprintf("min %s  mean %s  p50 %s  p90 %s  p99 %s  p99.9 %s  max %s",
		fmtUS(l.Min), fmtUS(l.Mean), fmtUS(l.P50), fmtUS(l.P90), fmtUS(l.P99), fmtUS(l.P999), fmtUS(l.Max))
}

// fmtUS renders microseconds with a unit a person reads at a glance.
func fmtUS(v float64) string {
	switch {
	case v < 1000:
		return fmt.Sprintf("%.0fµs", v)
	case v < 10000:
		return fmt.Sprintf("%.2fms", v/1e3)
	case v < 1e6:
		return fmt.Sprintf("%.1fms", v/1e3)
	default:
		return fmt.Sprintf("%.2fs", v/1e6)
	}
}

func fmtDur(d time.Duration) string { return fmtUS(float64(d) / 1e3) }

func fmtBytes(n int64) string {
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

// formatCount renders a count or a rate with thousands separators.
func formatCount(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return fmt.Sprint(v)
	}
	neg := v < 0
	if neg {
		v = -v
	}
	var s string
	if v < 100 && v != math.Trunc(v) {
		s = fmt.Sprintf("%.1f", v)
	} else {
		n := int64(math.Round(v))
		digits := fmt.Sprint(n)
		var b strings.Builder
		for i, c := range digits {
			if i > 0 && (len(digits)-i)%3 == 0 {
				b.WriteByte(',')
			}
			b.WriteRune(c)
		}
		s = b.String()
	}
	if neg {
		return "-" + s
	}
	return s
}
