package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// benchResult is the part of a `nitrosign bench` result the suite checks.
type benchResult struct {
	Name              string  `json:"name"`
	Target            string  `json:"target"`
	Requests          int64   `json:"requests"`
	Successes         int64   `json:"successes"`
	RPS               float64 `json:"rps"`
	ConnectionsOpened int64   `json:"connections_opened"`
	Errors            []struct {
		Code    string `json:"code"`
		Count   int64  `json:"count"`
		Example string `json:"example"`
	} `json:"errors"`
	Latency struct {
		Count int64   `json:"count"`
		Min   float64 `json:"min_us"`
		P50   float64 `json:"p50_us"`
		P99   float64 `json:"p99_us"`
		Max   float64 `json:"max_us"`
	} `json:"latency"`
	Uncorrected *struct {
		Count int64   `json:"count"`
		P50   float64 `json:"p50_us"`
	} `json:"latency_uncorrected"`
}

// checkSane asserts the shape of a result, never its speed: the suite runs
// under TCG emulation, 20-40x slower than the hardware.
func checkSane(t *testing.T, r benchResult, calls int64) {
	t.Helper()
	if r.Requests != calls || r.Successes != calls || len(r.Errors) != 0 {
		t.Fatalf("%s: %d requests, %d successes, errors %+v; want %d clean calls", r.Name, r.Requests, r.Successes, r.Errors, calls)
	}
	l := r.Latency
	if l.Count != calls || l.Min <= 0 || l.P50 < l.Min || l.P99 < l.P50 || l.Max < l.P99 {
		t.Fatalf("%s: latency summary not ordered: %+v", r.Name, l)
	}
	if r.RPS <= 0 {
		t.Fatalf("%s: %v calls/s", r.Name, r.RPS)
	}
}

// Scenario 7: the benchmark over real vsock. A short run against each end
// (the enclave directly over AF_VSOCK, and the proxy forwarding over its
// vsock pool) completes with every call successful and percentiles in
// order; compare interleaves both and reports the ratio; the open loop
// reports both latencies; connection churn dials vsock afresh.
func TestBenchmarkOverVsock(t *testing.T) {
	e := startEnclave(t, vsockPort())
	p := startProxy(t, e.target, 2)
	dir := t.TempDir()

	t.Run("compare direct and proxy", func(t *testing.T) {
		js := filepath.Join(dir, "compare.json")
		chart := filepath.Join(dir, "compare.svg")
		out, err := cli(t, "", "compare", "--target", "direct="+e.target, "--target", "proxy="+p.target,
			"--requests", "200", "--concurrency", "8", "--connections", "2", "--warmup", "0s", "--rounds", "2",
			"--call-timeout", "30s", "--json", js, "--chart", chart)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "proxy over direct: throughput") {
			t.Fatalf("compare output:\n%s", out)
		}
		var cmp struct {
			Results []benchResult `json:"results"`
			Ratios  []struct {
				Throughput float64 `json:"throughput_ratio"`
			} `json:"ratios"`
		}
		b, err := os.ReadFile(js)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &cmp); err != nil {
			t.Fatal(err)
		}
		if len(cmp.Results) != 2 || cmp.Results[0].Target != e.target || cmp.Results[1].Target != p.target {
			t.Fatalf("results %+v", cmp.Results)
		}
		for _, r := range cmp.Results {
			checkSane(t, r, 400)
		}
		if len(cmp.Ratios) != 1 || cmp.Ratios[0].Throughput <= 0 {
			t.Fatalf("ratios %+v", cmp.Ratios)
		}
		if svg, err := os.ReadFile(chart); err != nil || strings.Count(string(svg), "<polyline") != 2 {
			t.Fatalf("chart: %v", err)
		}
		t.Logf("over vsock under emulation (shape only, not speed):\n%s", out)
	})

	for _, end := range []struct{ name, target string }{{"direct-vsock", e.target}, {"proxy", p.target}} {
		t.Run("sign ecc "+end.name, func(t *testing.T) {
			out, err := cli(t, "", "bench", "--target", end.target, "--name", end.name, "--rpc", "sign", "--key-type", "ecc",
				"--requests", "100", "--concurrency", "4", "--warmup", "0s", "--call-timeout", "30s", "--output", "json")
			if err != nil {
				t.Fatal(err)
			}
			var r benchResult
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("%v:\n%s", err, out)
			}
			checkSane(t, r, 100)
		})
	}

	t.Run("open loop direct", func(t *testing.T) {
		out, err := cli(t, "", "bench", "--target", e.target, "--rate", "100", "--requests", "100", "--concurrency", "8",
			"--warmup", "0s", "--call-timeout", "30s", "--output", "json")
		if err != nil {
			t.Fatal(err)
		}
		var r benchResult
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("%v:\n%s", err, out)
		}
		checkSane(t, r, 100)
		if r.Uncorrected == nil || r.Uncorrected.Count != 100 || r.Uncorrected.P50 > r.Latency.P50*1.01 {
			t.Fatalf("open loop: uncorrected %+v, corrected p50 %v", r.Uncorrected, r.Latency.P50)
		}
	})

	t.Run("connection churn direct", func(t *testing.T) {
		out, err := cli(t, "", "bench", "--target", e.target, "--connect-every", "5", "--requests", "40", "--concurrency", "2",
			"--warmup", "0s", "--call-timeout", "30s", "--output", "json")
		if err != nil {
			t.Fatal(err)
		}
		var r benchResult
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("%v:\n%s", err, out)
		}
		checkSane(t, r, 40)
		if r.ConnectionsOpened < 8 || r.ConnectionsOpened > 10 {
			t.Fatalf("%d vsock connections opened for 40 calls, a fresh one every 5 per worker", r.ConnectionsOpened)
		}
	})
}
