package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fake is a Dialer whose connections run fn for each call and count
// dials, connects, closes and calls.
type fake struct {
	fn                       func(n int64) error
	dials, connects, closes  atomic.Int64
	calls, inFlight, maxSeen atomic.Int64
	dialErr                  error
}

func (f *fake) dial(context.Context) (Conn, error) {
	if f.dialErr != nil {
		return nil, f.dialErr
	}
	f.dials.Add(1)
	return &fakeConn{f: f}, nil
}

type fakeConn struct{ f *fake }

func (c *fakeConn) Call(ctx context.Context) error {
	n := c.f.calls.Add(1)
	cur := c.f.inFlight.Add(1)
	defer c.f.inFlight.Add(-1)
	for {
		m := c.f.maxSeen.Load()
		if cur <= m || c.f.maxSeen.CompareAndSwap(m, cur) {
			break
		}
	}
	if _, ok := ctx.Deadline(); !ok {
		return errors.New("call without a deadline")
	}
	if c.f.fn != nil {
		return c.f.fn(n)
	}
	return nil
}

func (c *fakeConn) Connect(context.Context) error { c.f.connects.Add(1); return nil }
func (c *fakeConn) Close() error                  { c.f.closes.Add(1); return nil }

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func cfg(mod func(*Config)) Config {
	c := DefaultConfig()
	c.Duration = 0
	c.Requests = 100
	mod(&c)
	return c
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"ok", func(*Config) {}, ""},
		{"zero concurrency", func(c *Config) { c.Concurrency = 0 }, "concurrency 0"},
		{"too many connections", func(c *Config) { c.Connections = 5; c.Concurrency = 4 }, "more than concurrency"},
		{"churn ignores connections", func(c *Config) { c.Connections = 5; c.Concurrency = 4; c.ConnectEvery = 3 }, ""},
		{"neither", func(c *Config) { c.Requests = 0 }, "give a duration or a number of requests"},
		{"both", func(c *Config) { c.Duration = time.Second }, "not both"},
		{"negative rate", func(c *Config) { c.Rate = -1 }, "rate -1"},
		{"negative warmup", func(c *Config) { c.Warmup = -time.Second }, "warmup"},
		{"negative churn", func(c *Config) { c.ConnectEvery = -1 }, "connect-every"},
		{"no call timeout", func(c *Config) { c.CallTimeout = 0 }, "call timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := cfg(tt.mod).Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestWorkloadValidate(t *testing.T) {
	tests := []struct {
		mod  func(*Workload)
		want string
	}{
		{func(*Workload) {}, ""},
		{func(w *Workload) { w.RPC = "ping" }, `rpc "ping"`},
		{func(w *Workload) { w.PayloadSize = -1 }, "payload size"},
		{func(w *Workload) { w.RPC = RPCSign; w.KeyType = "dsa" }, "key type"},
		{func(w *Workload) { w.RPC = RPCSign; w.Algorithm = "MD5" }, "unknown signing algorithm"},
		{func(w *Workload) { w.RPC = RPCSign; w.MessageType = "blob" }, "message type"},
		{func(w *Workload) { w.RPC = RPCSign; w.MessageSize = 5000 }, "raw message"},
		{func(w *Workload) { w.RPC = RPCSign; w.KeyType = "ed25519"; w.MessageType = "digest" }, "ED25519_PH_SHA_512"},
		{func(w *Workload) {
			w.RPC = RPCSign
			w.KeyType = "rsa"
			w.MessageType = "digest"
			w.Algorithm = "RSASSA_PSS_SHA_384"
		}, ""},
	}
	for _, tt := range tests {
		w := DefaultWorkload()
		tt.mod(&w)
		err := w.Validate()
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%+v: Validate() = %v, want %q", w, err, tt.want)
		}
	}
}

func TestClosedLoopRequests(t *testing.T) {
	f := &fake{}
	c := cfg(func(c *Config) { c.Requests = 500; c.Concurrency = 8; c.Connections = 2 })
	res, err := Run(testCtx(t), c, f.dial, Options{Target: "fake://", Workload: "fake"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != 500 || res.Successes != 500 || len(res.Errors) != 0 {
		t.Fatalf("requests %d successes %d errors %v, want 500 500 none", res.Requests, res.Successes, res.Errors)
	}
	if got := f.calls.Load(); got != 500 {
		t.Fatalf("%d calls made, want exactly 500 (no warm-up)", got)
	}
	if f.dials.Load() != 2 || f.connects.Load() != 2 || f.closes.Load() != 2 {
		t.Fatalf("dials %d connects %d closes %d, want 2 each", f.dials.Load(), f.connects.Load(), f.closes.Load())
	}
	if f.maxSeen.Load() > 8 {
		t.Fatalf("%d calls in flight, concurrency is 8", f.maxSeen.Load())
	}
	checkLatency(t, res.Latency, 500)
	if res.Uncorrected != nil {
		t.Fatal("closed loop reports an uncorrected latency")
	}
	if res.Name != "fake://" {
		t.Fatalf("name %q, want the target", res.Name)
	}
}

// checkLatency asserts the structure of a summary: counts and ordering, not
// timings.
func checkLatency(t *testing.T, l Latency, count int64) {
	t.Helper()
	if l.Count != count {
		t.Fatalf("latency count %d, want %d", l.Count, count)
	}
	seq := []float64{l.Min, l.P50, l.P90, l.P99, l.P999, l.Max}
	for i := 1; i < len(seq); i++ {
		if seq[i] < seq[i-1] {
			t.Fatalf("percentiles not ordered: %+v", l)
		}
	}
	if l.Min <= 0 || l.Mean < l.Min || l.Mean > l.Max {
		t.Fatalf("implausible summary: %+v", l)
	}
}

func TestErrorsByCode(t *testing.T) {
	f := &fake{fn: func(n int64) error {
		switch n % 4 {
		case 1:
			return status.Error(codes.Unavailable, "upstream gone")
		case 2:
			return status.Error(codes.InvalidArgument, "bad key")
		}
		return nil
	}}
	c := cfg(func(c *Config) { c.Requests = 400; c.Concurrency = 4 })
	res, err := Run(testCtx(t), c, f.dial, Options{Name: "errs"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != 400 || res.Successes != 200 {
		t.Fatalf("requests %d successes %d, want 400 200", res.Requests, res.Successes)
	}
	want := map[string]int64{"Unavailable": 100, "InvalidArgument": 100}
	if len(res.Errors) != 2 {
		t.Fatalf("errors %+v", res.Errors)
	}
	for _, e := range res.Errors {
		if want[e.Code] != e.Count || e.Example == "" {
			t.Fatalf("error %+v, want counts %v with an example", e, want)
		}
	}
	checkLatency(t, res.Latency, 200) // latencies count successes only
	var b strings.Builder
	if err := res.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "100 x Unavailable (first: upstream gone)") {
		t.Fatalf("text summary lacks the errors:\n%s", b.String())
	}
}

func TestWarmupIsNotRecorded(t *testing.T) {
	f := &fake{fn: func(int64) error { time.Sleep(time.Millisecond); return nil }}
	c := cfg(func(c *Config) { c.Requests = 50; c.Concurrency = 2; c.Warmup = 50 * time.Millisecond })
	res, err := Run(testCtx(t), c, f.dial, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != 50 {
		t.Fatalf("%d requests recorded, want 50", res.Requests)
	}
	if f.calls.Load() <= 50 {
		t.Fatalf("%d calls made: the warm-up made none", f.calls.Load())
	}
}

func TestOpenLoop(t *testing.T) {
	f := &fake{}
	c := cfg(func(c *Config) { c.Requests = 200; c.Concurrency = 4; c.Rate = 2000 })
	res, err := Run(testCtx(t), c, f.dial, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != 200 || f.calls.Load() != 200 || res.NotSent != 0 {
		t.Fatalf("requests %d calls %d not sent %d, want 200 200 0", res.Requests, f.calls.Load(), res.NotSent)
	}
	if res.Uncorrected == nil {
		t.Fatal("open loop without the uncorrected latency")
	}
	checkLatency(t, res.Latency, 200)
	checkLatency(t, *res.Uncorrected, 200)
	// Measured from the intended send time, a call can only look slower.
	if res.Latency.Max < res.Uncorrected.Max {
		t.Fatalf("corrected max %v below uncorrected max %v", res.Latency.Max, res.Uncorrected.Max)
	}
}

// A stalled target: calls queue behind the stall. The corrected latency
// counts the wait, the uncorrected one hides it. Structure only: the
// stall is 100x the schedule interval, so no timing is asserted beyond
// "the corrected p99 exceeds the uncorrected p99".
func TestOpenLoopCorrectsCoordinatedOmission(t *testing.T) {
	var once sync.Once
	f := &fake{fn: func(int64) error {
		once.Do(func() { time.Sleep(200 * time.Millisecond) })
		return nil
	}}
	c := cfg(func(c *Config) { c.Requests = 300; c.Concurrency = 1; c.Rate = 1000 })
	res, err := Run(testCtx(t), c, f.dial, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Latency.P90 <= res.Uncorrected.P90 {
		t.Fatalf("corrected p90 %vµs not above uncorrected p90 %vµs after a stall", res.Latency.P90, res.Uncorrected.P90)
	}
}

func TestConnectEvery(t *testing.T) {
	f := &fake{}
	c := cfg(func(c *Config) { c.Requests = 100; c.Concurrency = 1; c.ConnectEvery = 10 })
	res, err := Run(testCtx(t), c, f.dial, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if f.dials.Load() != 10 || res.ConnectionsOpened != 10 {
		t.Fatalf("dials %d, reported %d, want 10 (100 calls, a fresh connection every 10)", f.dials.Load(), res.ConnectionsOpened)
	}
	if f.closes.Load() != 10 {
		t.Fatalf("%d connections closed, want all 10", f.closes.Load())
	}
	if f.connects.Load() != 0 {
		t.Fatal("churned connections were connected ahead: their first call must pay for it")
	}
}

func TestDialErrorsAreCounted(t *testing.T) {
	f := &fake{dialErr: errors.New("refused")}
	c := cfg(func(c *Config) { c.Requests = 20; c.ConnectEvery = 1 })
	res, err := Run(testCtx(t), c, f.dial, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Successes != 0 || len(res.Errors) != 1 || res.Errors[0].Code != "Unavailable" || res.Errors[0].Count != 20 {
		t.Fatalf("errors %+v, want 20 Unavailable", res.Errors)
	}
	// A long-lived connection that cannot be made fails the run.
	if _, err := Run(testCtx(t), cfg(func(*Config) {}), f.dial, Options{Target: "fake://x"}); err == nil || !strings.Contains(err.Error(), "fake://x") {
		t.Fatalf("Run with an undialable target = %v", err)
	}
}

func TestDurationAndInterrupt(t *testing.T) {
	f := &fake{fn: func(int64) error { time.Sleep(100 * time.Microsecond); return nil }}
	c := cfg(func(c *Config) { c.Requests = 0; c.Duration = 100 * time.Millisecond; c.Concurrency = 2 })
	res, err := Run(testCtx(t), c, f.dial, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests == 0 || res.Elapsed < c.Duration || res.RPS <= 0 || res.Interrupted {
		t.Fatalf("requests %d elapsed %v rps %v interrupted %v", res.Requests, res.Elapsed, res.RPS, res.Interrupted)
	}

	ctx, cancel := context.WithCancel(testCtx(t))
	f2 := &fake{fn: func(n int64) error {
		if n == 20 {
			cancel()
		}
		return nil
	}}
	c.Duration = time.Hour
	res, err = Run(ctx, c, f2.dial, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Interrupted || res.Requests < 19 || len(res.Errors) != 0 {
		t.Fatalf("interrupted %v requests %d errors %v", res.Interrupted, res.Requests, res.Errors)
	}
}

func TestCompareRoundsAndRatios(t *testing.T) {
	var order []string
	var mu sync.Mutex
	mk := func(name string, fail bool) Target {
		return Target{Name: name, Addr: name + "://", Dial: func(context.Context) (Conn, error) {
			mu.Lock()
			order = append(order, name)
			mu.Unlock()
			return &fakeConn{f: &fake{fn: func(n int64) error {
				if fail && n%2 == 0 {
					return status.Error(codes.ResourceExhausted, "busy")
				}
				return nil
			}}}, nil
		}}
	}
	c := cfg(func(c *Config) { c.Requests = 100; c.Concurrency = 2 })
	cmp, err := Compare(testCtx(t), c, []Target{mk("a", false), mk("b", true)}, CompareOptions{Rounds: 3, Workload: "fake"})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(order, " "); got != "a b a b a b" {
		t.Fatalf("dial order %q, want interleaved rounds a b a b a b", got)
	}
	if len(cmp.Results) != 2 || cmp.Results[0].Requests != 300 || len(cmp.Results[1].Rounds) != 3 {
		t.Fatalf("results %+v", cmp.Results)
	}
	b := cmp.Results[1]
	if b.Successes != 150 || b.Errors[0].Count != 150 {
		t.Fatalf("b: successes %d errors %+v", b.Successes, b.Errors)
	}
	checkLatency(t, cmp.Results[0].Latency, 300)
	if len(cmp.Ratios) != 1 || cmp.Ratios[0].Target != "b" || cmp.Ratios[0].Baseline != "a" || cmp.Ratios[0].Throughput <= 0 {
		t.Fatalf("ratios %+v", cmp.Ratios)
	}
	// Per round: b's p50 minus a's in the same round, and their median.
	x := cmp.Ratios[0]
	if len(x.AddedP50ByRound) != 3 || x.MedianAddedP50 == nil {
		t.Fatalf("per-round added p50 missing: %+v", x)
	}
	for i, d := range x.AddedP50ByRound {
		if want := cmp.Results[1].Rounds[i].P50 - cmp.Results[0].Rounds[i].P50; d != want {
			t.Fatalf("round %d: added p50 %v, want %v", i, d, want)
		}
	}
	if *x.MedianAddedP50 != median(x.AddedP50ByRound) {
		t.Fatalf("median %v of %v", *x.MedianAddedP50, x.AddedP50ByRound)
	}
	var text strings.Builder
	if err := cmp.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"3 rounds per target, interleaved", "b over a: throughput", "p99", "p50 added per round: median"} {
		if !strings.Contains(text.String(), want) {
			t.Fatalf("comparison text lacks %q:\n%s", want, text.String())
		}
	}
	// JSON round trip keeps the figures.
	raw, err := json.Marshal(cmp)
	if err != nil {
		t.Fatal(err)
	}
	var back struct {
		Results []struct {
			Requests  int64   `json:"requests"`
			Elapsed   float64 `json:"elapsed_s"`
			Latency   Latency `json:"latency"`
			Curve     []Point `json:"percentile_curve"`
			RoundsLen []Round `json:"rounds"`
		} `json:"results"`
		Ratios []Ratio `json:"ratios"`
	}
	if err := json.Unmarshal(raw, &back); err != nil {
		t.Fatal(err)
	}
	if back.Results[0].Requests != 300 || back.Results[0].Elapsed <= 0 || back.Results[0].Latency.Count != 300 ||
		len(back.Results[0].Curve) < 2 || len(back.Results[0].RoundsLen) != 3 || len(back.Ratios) != 1 {
		t.Fatalf("JSON lost figures: %s", raw)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{5}, 5},
		{[]float64{3, -1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		in := slices.Clone(c.in)
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
		if !slices.Equal(in, c.in) {
			t.Errorf("Median changed its input: %v", c.in)
		}
	}
}

func TestCompareRejects(t *testing.T) {
	d := (&fake{}).dial
	c := cfg(func(*Config) {})
	if _, err := Compare(testCtx(t), c, nil, CompareOptions{}); err == nil {
		t.Fatal("no targets accepted")
	}
	if _, err := Compare(testCtx(t), c, []Target{{Name: "a", Dial: d}, {Name: "a", Dial: d}}, CompareOptions{}); err == nil {
		t.Fatal("duplicate names accepted")
	}
}

func TestHistogramSummaryAndCurve(t *testing.T) {
	h := newHistogram()
	for i := 1; i <= 1000; i++ {
		record(h, time.Duration(i)*time.Microsecond)
	}
	record(h, 2*time.Hour) // clamped to the top, not dropped
	l := summarize(h)
	if l.Count != 1001 {
		t.Fatalf("count %d", l.Count)
	}
	within := func(got, want float64) bool { return got >= want*0.99 && got <= want*1.01 }
	if !within(l.P50, 500) || !within(l.P90, 900) || !within(l.P99, 990) || !within(l.Min, 1) {
		t.Fatalf("percentiles %+v", l)
	}
	if l.Max < 59e6 {
		t.Fatalf("max %v: an over-range value must be clamped to the top", l.Max)
	}
	pts := curve(h)
	if pts[0].Percentile != 0 || pts[len(pts)-1].Percentile != 100 {
		t.Fatalf("curve from %v to %v", pts[0], pts[len(pts)-1])
	}
	for i := 1; i < len(pts); i++ {
		if pts[i].Percentile <= pts[i-1].Percentile || pts[i].Latency < pts[i-1].Latency {
			t.Fatalf("curve not monotonic at %d: %v %v", i, pts[i-1], pts[i])
		}
	}
	// With 1001 values the curve stops at 3 nines (99.9%) before the max.
	if p := pts[len(pts)-2].Percentile; p > 99.9 {
		t.Fatalf("curve claims p%v from 1001 values", p)
	}
	if summarize(newHistogram()) != (Latency{}) || curve(newHistogram()) != nil {
		t.Fatal("empty histogram must summarise to zero")
	}
}

func TestChartIsWellFormed(t *testing.T) {
	f := &fake{}
	c := cfg(func(c *Config) { c.Requests = 300 })
	a, err := Run(testCtx(t), c, f.dial, Options{Name: "direct <vsock>", Workload: "echo & co"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Run(testCtx(t), c, f.dial, Options{Name: "proxy"})
	if err != nil {
		t.Fatal(err)
	}
	empty := &Result{Name: "empty"}
	empty.finish()
	for _, format := range []ChartFormat{ChartSVG, ChartHTML} {
		var buf bytes.Buffer
		if err := WriteChart(&buf, "title", []*Result{a, b, empty}, format); err != nil {
			t.Fatal(err)
		}
		out := buf.String()
		if format == ChartSVG {
			dec := xml.NewDecoder(strings.NewReader(out))
			for {
				if _, err := dec.Token(); err == io.EOF {
					break
				} else if err != nil {
					t.Fatalf("SVG is not well-formed XML: %v", err)
				}
			}
		}
		if strings.Count(out, "<polyline") != 2 || !strings.Contains(out, "direct &lt;vsock&gt;") || strings.Contains(out, "<script") {
			t.Fatalf("chart (format %d) lacks curves or escapes:\n%.500s", format, out)
		}
	}
}

func TestProcessWatch(t *testing.T) {
	if _, err := os.Stat("/proc/self/status"); err != nil {
		t.Skip("no /proc: process watching is Linux-only")
	}
	f := &fake{fn: func(int64) error { time.Sleep(time.Millisecond); return nil }}
	c := cfg(func(c *Config) { c.Requests = 150 })
	res, err := Run(testCtx(t), c, f.dial, Options{WatchPIDs: []int{os.Getpid(), 1 << 30}})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Processes) != 2 {
		t.Fatalf("processes %+v", res.Processes)
	}
	self, gone := res.Processes[0], res.Processes[1]
	if self.PeakRSS <= 0 || self.HighWaterRSS < self.PeakRSS || self.Name == "" || self.Error != "" {
		t.Fatalf("own process: %+v", self)
	}
	if gone.Error == "" {
		t.Fatalf("a missing process reports no error: %+v", gone)
	}
	if rss, err := ResidentBytes(os.Getpid()); err != nil || rss <= 0 {
		t.Fatalf("ResidentBytes of this process: %d, %v", rss, err)
	}
	if _, err := ResidentBytes(1 << 30); err == nil {
		t.Fatal("ResidentBytes of a missing process: no error")
	}
}

func TestFormatCount(t *testing.T) {
	for in, want := range map[float64]string{0: "0", 999: "999", 1000: "1,000", 1234567: "1,234,567", 12.5: "12.5", -4200: "-4,200"} {
		if got := formatCount(in); got != want {
			t.Errorf("formatCount(%v) = %q, want %q", in, got, want)
		}
	}
}
