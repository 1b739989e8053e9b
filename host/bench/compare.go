package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Target is one system a Compare measures.
type Target struct {
	// Name labels it in reports ("direct", "proxy", "socat"); unique.
	Name string
	// Addr is its address, for reports.
	Addr string
	// Dial opens its connections.
	Dial Dialer
}

// CompareOptions tune Compare.
type CompareOptions struct {
	// Rounds is how many times each target is measured, interleaved
	// (A B A B ...), each round with the whole Config (warm-up included).
	// Default 1.
	Rounds int
	// Workload describes the calls, for reports.
	Workload string
	// Progress receives the live progress line (see Options.Progress).
	Progress io.Writer
	// WatchPIDs are sampled during every run (see Options.WatchPIDs).
	WatchPIDs []int
	// Pause is how long to wait between two runs, so that connections the
	// previous run closed are torn down before the next starts. Default 0.
	Pause time.Duration
}

// Ratio compares a target with the baseline (the first target).
type Ratio struct {
	Target   string `json:"target"`
	Baseline string `json:"baseline"`
	// Throughput is the target's RPS over the baseline's.
	Throughput float64 `json:"throughput_ratio"`
	// AddedP50, AddedP90 and AddedP99 are the target's percentile minus the
	// baseline's, in microseconds (negative: the target was faster).
	AddedP50 float64 `json:"added_p50_us"`
	AddedP90 float64 `json:"added_p90_us"`
	AddedP99 float64 `json:"added_p99_us"`
	// AddedP50ByRound is, for each round, the target's p50 minus the
	// baseline's in the same round (measured one after the other), and
	// MedianAddedP50 their median: on a machine whose speed drifts between
	// rounds it is steadier than AddedP50, which compares the rounds
	// merged. Set when both ran more than one round.
	AddedP50ByRound []float64 `json:"added_p50_by_round_us,omitempty"`
	MedianAddedP50  *float64  `json:"median_added_p50_us,omitempty"`
}

// Comparison is the outcome of Compare.
type Comparison struct {
	Workload string `json:"workload"`
	Load     string `json:"load"`
	Rounds   int    `json:"rounds"`
	// Results has one entry per target, in the order given, each merging
	// its rounds.
	Results []*Result `json:"results"`
	// Ratios compare each target after the first with the first.
	Ratios []Ratio `json:"ratios"`
	// Interrupted is set when the comparison was cut short.
	Interrupted bool `json:"interrupted,omitempty"`
}

// Compare measures every target with the same load in interleaved rounds,
// so that noise on a shared machine falls on all of them alike, and reports
// each target (rounds merged) and its ratios to the first.
func Compare(ctx context.Context, cfg Config, targets []Target, o CompareOptions) (*Comparison, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("bench config: %w", err)
	}
	if o.Rounds == 0 {
		o.Rounds = 1
	}
	if o.Rounds < 0 || o.Rounds > 1000 {
		return nil, fmt.Errorf("rounds %d: must be between 1 and 1000", o.Rounds)
	}
	if len(targets) == 0 {
		return nil, errors.New("compare: no target")
	}
	seen := map[string]bool{}
	for _, t := range targets {
		if t.Name == "" || t.Dial == nil {
			return nil, fmt.Errorf("compare: target %q has no name or dialer", t.Addr)
		}
		if seen[t.Name] {
			return nil, fmt.Errorf("compare: two targets are named %q", t.Name)
		}
		seen[t.Name] = true
	}
	rounds := make([][]*Result, len(targets))
	interrupted := false
rounds:
	for r := range o.Rounds {
		for i, t := range targets {
			if ctx.Err() != nil {
				interrupted = true
				break rounds
			}
			if (r > 0 || i > 0) && o.Pause > 0 {
				select {
				case <-time.After(o.Pause):
				case <-ctx.Done():
					interrupted = true
					break rounds
				}
			}
			res, err := Run(ctx, cfg, t.Dial, Options{
				Name: t.Name, Target: t.Addr, Workload: o.Workload, Progress: o.Progress,
				WatchPIDs: o.WatchPIDs, Round: fmt.Sprintf("[round %d/%d] ", r+1, o.Rounds),
			})
			if err != nil {
				return nil, fmt.Errorf("%s (%s): %w", t.Name, t.Addr, err)
			}
			rounds[i] = append(rounds[i], res)
			if res.Interrupted {
				interrupted = true
				break rounds
			}
		}
	}
	cmp := &Comparison{Workload: o.Workload, Load: cfg.Shape(), Rounds: o.Rounds, Interrupted: interrupted}
	for _, rs := range rounds {
		if m := merge(rs); m != nil {
			cmp.Results = append(cmp.Results, m)
		}
	}
	if len(cmp.Results) > 0 {
		base := cmp.Results[0]
		for _, r := range cmp.Results[1:] {
			cmp.Ratios = append(cmp.Ratios, ratio(base, r))
		}
	}
	if cmp.Ratios == nil {
		cmp.Ratios = []Ratio{}
	}
	return cmp, nil
}

func ratio(base, r *Result) Ratio {
	x := Ratio{
		Target:   r.Name,
		Baseline: base.Name,
		AddedP50: r.Latency.P50 - base.Latency.P50,
		AddedP90: r.Latency.P90 - base.Latency.P90,
		AddedP99: r.Latency.P99 - base.Latency.P99,
	}
	if base.RPS > 0 {
		x.Throughput = r.RPS / base.RPS
	}
	if n := len(r.Rounds); n > 1 && n == len(base.Rounds) {
		x.AddedP50ByRound = make([]float64, n)
		for i := range n {
			x.AddedP50ByRound[i] = r.Rounds[i].P50 - base.Rounds[i].P50
		}
		m := median(x.AddedP50ByRound)
		x.MedianAddedP50 = &m
	}
	return x
}

// median is the median of xs (the mean of the two middle values when
// their number is even); 0 when xs is empty. xs is not changed.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if n := len(s); n%2 == 1 {
		return s[n/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// WriteText writes the comparison as a table, then the ratios.
func (c *Comparison) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "compare: %s; %s; %d round%s per target, interleaved\n", c.Workload, c.Load, c.Rounds, plural(c.Rounds))
	uncorr := false
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tcalls/s\tp50\tp90\tp99\tp99.9\tmax\tmean\tcalls\terrors\t")
	for _, r := range c.Results {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.Name, formatCount(r.RPS),
			fmtUS(r.Latency.P50), fmtUS(r.Latency.P90), fmtUS(r.Latency.P99), fmtUS(r.Latency.P999), fmtUS(r.Latency.Max), fmtUS(r.Latency.Mean),
			formatCount(float64(r.Requests)), formatCount(float64(r.errorCount())))
		uncorr = uncorr || r.Uncorrected != nil
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if uncorr {
		b.WriteString("latency from the intended send time (coordinated omission corrected); uncorrected, from the actual send time:\n")
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "target\tp50\tp90\tp99\tp99.9\tmax\t")
		for _, r := range c.Results {
			if u := r.Uncorrected; u != nil {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t\n", r.Name, fmtUS(u.P50), fmtUS(u.P90), fmtUS(u.P99), fmtUS(u.P999), fmtUS(u.Max))
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	for _, r := range c.Results {
		if len(r.Rounds) > 1 {
			fmt.Fprintf(&b, "%s per round:", r.Name)
			for _, rd := range r.Rounds {
				fmt.Fprintf(&b, " %s", formatCount(rd.RPS))
			}
			b.WriteString(" calls/s\n")
		}
		for _, e := range r.Errors {
			fmt.Fprintf(&b, "%s errors: %s x %s (first: %s)\n", r.Name, formatCount(float64(e.Count)), e.Code, e.Example)
		}
		if r.NotSent > 0 {
			fmt.Fprintf(&b, "WARNING: %s: %s scheduled calls were never sent (it could not keep up); its latencies understate\n", r.Name, formatCount(float64(r.NotSent)))
		}
		if r.ConnectionsOpened > 0 && r.Config.ConnectEvery > 0 {
			fmt.Fprintf(&b, "%s: %s connections opened\n", r.Name, formatCount(float64(r.ConnectionsOpened)))
		}
		for _, p := range r.Processes {
			fmt.Fprintf(&b, "%s: process %d (%s) peak RSS %s, high-water %s, CPU %s per call\n", r.Name, p.PID, p.Name, fmtBytes(p.PeakRSS), fmtBytes(p.HighWaterRSS), fmtUS(p.CPUPerCall))
		}
	}
	for _, x := range c.Ratios {
		fmt.Fprintf(&b, "%s over %s: throughput %.2fx, p50 %s, p90 %s, p99 %s", x.Target, x.Baseline, x.Throughput,
			signedUS(x.AddedP50), signedUS(x.AddedP90), signedUS(x.AddedP99))
		if x.MedianAddedP50 != nil {
			fmt.Fprintf(&b, "; p50 added per round: median %s (%s to %s)", signedUS(*x.MedianAddedP50),
				signedUS(slices.Min(x.AddedP50ByRound)), signedUS(slices.Max(x.AddedP50ByRound)))
		}
		b.WriteString("\n")
	}
	if c.Interrupted {
		b.WriteString("(interrupted: partial results)\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func signedUS(v float64) string {
	if v < 0 {
		return "-" + fmtUS(-v)
	}
	return "+" + fmtUS(v)
}
