package reliability_test

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nitrosign/nitrosign/host/proxy"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// soakCalls is the soak's size: a short run in CI, NITROSIGN_SOAK_CALLS
// (e.g. 1000000, `make soak`) for the full one.
func soakCalls(tb testing.TB) int64 {
	if s := os.Getenv("NITROSIGN_SOAK_CALLS"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 1000 {
			tb.Fatalf("NITROSIGN_SOAK_CALLS=%q: want a number >= 1000", s)
		}
		return n
	}
	if testing.Short() {
		return 5000
	}
	return 20000
}

// TestSoak sends mixed Echo and Sign calls (ECC, Ed25519 and RSA keys,
// every answer checked: payload back, signature verified) through the
// proxy graph to the enclave graph, from 16 concurrent callers: every call
// must succeed, and live heap and goroutines must stay flat. Memory is
// compared as live heap after GC against the warmed-up baseline, with a
// ratio and an allowance, never by timing.
func TestSoak(t *testing.T) {
	calls := soakCalls(t)
	log := testLogger(t, nil)
	e := startEnclave(t, enclaveConfig(nil), 0, log)
	p := startProxy(t, proxyConfig(e.target(), func(c *proxy.Config) { c.Pool.Size = 4 }), 0, log)
	p.waitReady(t, 4)
	cc := dial(t, p.addr)

	// Warm up (key cache, buffer pools, stream workers), then measure.
	warm := &loadStats{}
	runLoad(cc, loadOpts{workers: 16, deadline: 10 * time.Second, calls: 2000}, nil, warm)
	if warm.ok.Load() != 2000 {
		t.Fatalf("warm-up: %s", warm)
	}
	base := measure()

	const samples = 10
	var (
		mu      sync.Mutex
		heap    []uint64
		gor     []int
		next    = calls / samples / 2 // mid-way through each tenth
		started = time.Now()
	)
	st := &loadStats{}
	runLoad(cc, loadOpts{workers: 16, deadline: 30 * time.Second, calls: calls, every: func(done int64) {
		mu.Lock()
		defer mu.Unlock()
		if done < next {
			return
		}
		next += calls / samples
		m := measure()
		heap = append(heap, m.heap)
		gor = append(gor, m.goroutines)
	}}, nil, st)
	elapsed := time.Since(started)

	var hs []string
	for _, h := range heap {
		hs = append(hs, fmt.Sprintf("%.1f", mib(h)))
	}
	summary := fmt.Sprintf("%d calls in %s (%.0f calls/s, 16 callers, GOMAXPROCS %d): %s; live heap MiB at each tenth: [%s] (baseline %.1f); goroutines %v (baseline %d)",
		calls, elapsed.Round(time.Second), float64(calls)/elapsed.Seconds(), runtime.GOMAXPROCS(0), st, strings.Join(hs, " "), mib(base.heap), gor, base.goroutines)
	t.Log(summary)
	if path := os.Getenv("NITROSIGN_SOAK_REPORT"); path != "" {
		_ = os.WriteFile(path, []byte(summary+"\n"), 0o644)
	}

	if st.ok.Load() != calls || st.total() != calls {
		t.Fatalf("not every call succeeded: %s", st)
	}
	// Flat: no sample (taken under load, so it includes the calls in
	// flight) grows past twice the baseline plus 16 MiB; a leak of even a
	// few hundred bytes a call would pass that within the full soak.
	limit := uint64(float64(base.heap)*2) + 16<<20
	for i, h := range heap {
		if h > limit {
			t.Fatalf("live heap %.1f MiB at sample %d: over %.1f MiB (baseline %.1f MiB)", mib(h), i+1, mib(limit), mib(base.heap))
		}
	}
	// The enclave counted the calls too (the proxy hid no failure).
	resp, err := pb.NewStatsServiceClient(cc).GetStats(callCtx(t), &pb.GetStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var counted uint64
	for _, c := range resp.GetCalls() {
		if c.GetCode() == "OK" && (strings.HasSuffix(c.GetMethod(), "/Echo") || strings.HasSuffix(c.GetMethod(), "/Sign")) {
			counted += c.GetCount()
		}
	}
	if counted < uint64(calls) {
		t.Fatalf("the enclave counted %d OK Echo/Sign calls, want >= %d", counted, calls)
	}
	settles(t, "after the soak", base, 10, 1.5, 8<<20)
}
