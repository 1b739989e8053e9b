package reliability_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/bench"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Client isolation: one hostile client (one connection, or a few) must not
// hurt another. Each TestIsolation* test runs the real enclave graph behind
// the real proxy graph (default configuration, pool of 2), measures a
// well-behaved grpc-go client making Echo calls at a fixed open-loop rate on
// its own connection while nobody attacks (the quiet figures), then runs one
// attack from other connections and measures the same client again for as
// long. Every attack is bounded in count and in time and stops by itself.
// It runs in its own process (see TestIsolationAttackerProcess), as from
// another host.
//
// Under every attack:
//   - the good client has no error at all;
//   - its achieved rate is at least 80% of its quiet rate;
//   - its p99 latency is within 10x its quiet p99 (in the short version,
//     max(10x, 50ms): it runs under -race on a shared 2-core machine, where
//     a quiet p99 of 2-3 ms is mostly scheduling noise);
//   - the test process's heap in use (runtime.MemStats.HeapInuse: the
//     proxy, the enclave and the good client together; the attacker is
//     another process), sampled every 50ms from the start of the attack to
//     its end, stays under 256 MiB, the proxy's intended bound on its
//     memory (twice its default --memory-budget of 128 MiB); and so does
//     the test process's resident set (VmRSS, sampled alike), which holds
//     the proxy's and so bounds it from above. RSS is asserted in the
//     short version without the race detector (make test runs the suite a
//     second time without it; the detector's shadow memory multiplies a
//     process's RSS) and logged otherwise: in the long version the bound
//     is too loose to decide, since the enclave in the same process holds
//     the long zero-window attack's responses (the test process reached
//     256.4 MiB there, the proxy alone, in a process of its own under the
//     same attack, 216 MiB: docs/RELIABILITY.md);
//   - no upstream connection is replaced: (*proxy.Proxy).UpstreamConnects
//     stays at the pool size (2).
//
// Some attacks add their own criterion: the enclave does no work for streams
// a client resets or never completes (the sum of
// (*proxy.Proxy).UpstreamCalls grows by at most the good client's calls
// plus a handful), the attacker's connection is ended with GOAWAY
// ENHANCE_YOUR_CALM, a flood's connection is closed.
//
// The short versions take about 5 s each. NITROSIGN_ISOLATION_LONG=1 (make
// isolation-long, without -race) runs longer windows, more connections,
// 1000 health watches and 5000 concurrent 64 KiB Echo calls a side.

const (
	isoPoolSize     = 2               // proxyConfig's pool
	isoGoodRate     = 100             // good Echo calls per second, open loop
	isoMemBudget    = 256 << 20       // peak HeapInuse, and RSS, of the test process
	isoHandful      = 16              // upstream streams an attack may cost the enclave
	isoGoodDeadline = 5 * time.Second // of each good call
	isoSample       = 50 * time.Millisecond
	isoFrame        = 16384 // the proxy's SETTINGS_MAX_FRAME_SIZE (the default)
	watchPath       = "/grpc.health.v1.Health/Watch"
)

// isoSizes are the bounds of the attacks: short (CI, -race) or long.
type isoSizes struct {
	window   time.Duration // quiet and attack measurement windows
	lead     time.Duration // an attack runs this long before the window opens
	p99Floor time.Duration // the p99 bound is max(10x quiet p99, p99Floor); 0 in the long version

	rapidConns, rapidStreams int           // rapid reset: connections (reconnecting attacker), streams in all
	resetBudgetStreams       int           // rapid reset until GOAWAY: streams on one connection
	floodConns               int           // SETTINGS/PING flood
	watches                  int           // health Watch streams on one connection
	headerOnlyConns          int           // connections of 1024 header-only streams each
	pingRounds               int           // malformed request + PING rounds
	contFrames               int           // CONTINUATION frames
	hpackBlocks              int           // header blocks of the HPACK flood
	bigConns, bigCalls       int           // zero-window / non-reading: connections each, calls per connection
	bigSetup                 time.Duration // bound of the time they take to make their calls
}

func isoLong() bool { return os.Getenv("NITROSIGN_ISOLATION_LONG") == "1" }

// rssAsserted reports whether the test process's RSS is a criterion: in
// the short version, without the race detector.
func rssAsserted() bool { return !raceEnabled && !isoLong() }

func isolationSizes() isoSizes {
	if isoLong() {
		return isoSizes{window: 5 * time.Second, lead: time.Second,
			rapidConns: 1000, rapidStreams: 5_000_000, resetBudgetStreams: 100_000, floodConns: 100,
			watches: 1000, headerOnlyConns: 4, pingRounds: 100_000, contFrames: 50_000_000,
			hpackBlocks: 1_000_000, bigConns: 5, bigCalls: 1000, bigSetup: time.Minute}
	}
	return isoSizes{window: 1250 * time.Millisecond, lead: 250 * time.Millisecond, p99Floor: 50 * time.Millisecond,
		rapidConns: 50, rapidStreams: 200_000, resetBudgetStreams: 10_000, floodConns: 20,
		watches: 100, headerOnlyConns: 1, pingRounds: 5000, contFrames: 2_000_000,
		hpackBlocks: 50_000, bigConns: 1, bigCalls: 128, bigSetup: 3 * time.Second}
}

// --- the environment -----------------------------------------------------

// isoEnv is an enclave, a proxy in front of it, and the good client with
// its quiet figures.
type isoEnv struct {
	t     *testing.T
	sz    isoSizes
	p     *proxyProc
	good  *grpc.ClientConn
	quiet goodResult
}

func newIsoEnv(t *testing.T) *isoEnv {
	t.Helper()
	log := testLogger(t, nil)
	enc := startEnclave(t, enclaveConfig(nil), 0, log)
	p := startProxy(t, proxyConfig(enc.target(), nil), 0, log)
	p.waitReady(t, isoPoolSize)
	eventually(t, 20*time.Second, "every relay lane connected", func() bool {
		return p.px.Ready() >= isoPoolSize && p.px.UpstreamConnects() == isoPoolSize
	})
	e := &isoEnv{t: t, sz: isolationSizes(), p: p, good: dial(t, p.addr)}
	// Warm up: connection, buffers, the enclave's first calls.
	if w := openLoop(echoCall(e.good), isoGoodRate, 300*time.Millisecond); w.failed() > 0 {
		t.Fatalf("warm-up: %s", w)
	}
	e.quiet = openLoop(echoCall(e.good), isoGoodRate, e.sz.window)
	if e.quiet.failed() > 0 {
		t.Fatalf("quiet: %s", e.quiet)
	}
	if c := p.px.UpstreamConnects(); c != isoPoolSize {
		t.Fatalf("upstream connections established before the attack: %d, want %d", c, isoPoolSize)
	}
	return e
}

// goodWindow measures the good client for one window; extra loads (other
// calls of the same client) run beside its Echo calls.
func (e *isoEnv) goodWindow(extra ...*goodLoad) goodResult {
	var wg sync.WaitGroup
	for _, l := range extra {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.result = openLoop(l.call, l.rate, e.sz.window)
		}()
	}
	r := openLoop(echoCall(e.good), isoGoodRate, e.sz.window)
	wg.Wait()
	return r
}

// timingMiss says which timing criterion of check (rate, p99) r misses,
// when r and the extra loads had no failed call; "" otherwise.
func (e *isoEnv) timingMiss(r goodResult, extra []*goodLoad) string {
	if r.failed() > 0 {
		return ""
	}
	for _, l := range extra {
		if l.result.failed() > 0 {
			return ""
		}
	}
	if e.slowRate(r) {
		return fmt.Sprintf("fell to %.1f calls/s (quiet %.1f/s)", r.rate(), e.quiet.rate())
	}
	if bound := e.p99Bound(); r.p99() > bound {
		return fmt.Sprintf("had a p99 of %s (bound %s)", r.p99().Round(10*time.Microsecond), bound)
	}
	return ""
}

// The timing criteria of check: the good client keeps 80% of its quiet
// rate, and its p99 stays within p99Bound.
func (e *isoEnv) slowRate(r goodResult) bool { return r.rate() < 0.8*e.quiet.rate() }
func (e *isoEnv) p99Bound() time.Duration    { return max(10*e.quiet.p99(), e.sz.p99Floor) }

// check applies the criteria every attack shares and logs the figures.
func (e *isoEnv) check(attack goodResult, m monResult) {
	t := e.t
	t.Helper()
	bound := e.p99Bound()
	t.Logf("good client quiet:        %s", e.quiet)
	t.Logf("good client under attack: %s", attack)
	t.Logf("rate %.0f%% of quiet (want >= 80%%), p99 %s (bound %s); %s",
		100*attack.rate()/e.quiet.rate(), attack.p99().Round(10*time.Microsecond), bound, m)
	if n := attack.failed(); n > 0 {
		t.Errorf("the good client had %d failed calls of %d: %s", n, attack.issued, attack.errString())
	}
	slow := e.slowRate(attack)
	if slow {
		t.Errorf("the good client's rate fell to %.1f/s, quiet %.1f/s: under 80%%", attack.rate(), e.quiet.rate())
	}
	if p := attack.p99(); p > bound {
		slow = true
		t.Errorf("the good client's p99 is %s under attack, quiet %s: over %s", p.Round(10*time.Microsecond), e.quiet.p99().Round(10*time.Microsecond), bound)
	}
	if slow {
		// Not a criterion: a hint at whether the machine (shared, loaded
		// by others) or the proxy stayed slow once the attack was over.
		t.Logf("good client again after the attack: %s", openLoop(echoCall(e.good), isoGoodRate, e.sz.window))
	}
	if m.peakHeap > isoMemBudget {
		t.Errorf("heap in use peaked at %.1f MiB during the attack: over the %.0f MiB budget", mib(m.peakHeap), mib(isoMemBudget))
	}
	if rssAsserted() && m.peakRSS > isoMemBudget {
		t.Errorf("the process's RSS peaked at %.1f MiB during the attack: over the %.0f MiB budget", mib(m.peakRSS), mib(isoMemBudget))
	}
	if m.maxConnects != isoPoolSize || m.connectsAfter != isoPoolSize {
		t.Errorf("upstream connections established: up to %d during the attack, %d after it; want %d (none replaced)",
			m.maxConnects, m.connectsAfter, isoPoolSize)
	}
}

// checkNoUpstreamWork asserts that the attack cost the enclave at most a
// handful of streams: every upstream stream opened during the attack beyond
// one per good call.
func (e *isoEnv) checkNoUpstreamWork(attack goodResult, m monResult, what string) {
	e.t.Helper()
	if extra := int64(m.upstreamStreams) - int64(attack.issued); extra > isoHandful {
		e.t.Errorf("%s: the proxy opened %d upstream streams during the attack, %d beyond the good client's %d calls (at most %d allowed): the enclave worked for the attacker",
			what, m.upstreamStreams, extra, attack.issued, isoHandful)
	}
}

// --- monitoring ------------------------------------------------------------

// monitor samples the heap and the upstream connections while an attack
// runs.
type monitor struct {
	p     *proxyProc
	calls uint64 // sum of UpstreamCalls at the start
	stop  chan struct{}
	once  sync.Once
	done  chan struct{}
	res   monResult
}

type monResult struct {
	peakHeap        uint64 // HeapInuse
	peakRSS         uint64 // VmRSS (0: not readable)
	maxConnects     uint64 // UpstreamConnects, highest sample
	connectsAfter   uint64
	upstreamStreams uint64 // growth of the sum of UpstreamCalls
	samples         int
}

func (m monResult) String() string {
	rss := fmt.Sprintf("peak RSS %.1f MiB", mib(m.peakRSS))
	switch {
	case raceEnabled:
		rss += " (race detector: not a criterion)"
	case !rssAsserted():
		rss += " (long version: not a criterion)"
	}
	return fmt.Sprintf("peak heap in use %.1f MiB, %s (%d samples, budget %.0f MiB); upstream connections %d (max %d); upstream streams opened +%d",
		mib(m.peakHeap), rss, m.samples, mib(isoMemBudget), m.connectsAfter, m.maxConnects, m.upstreamStreams)
}

func (e *isoEnv) monitor() *monitor {
	m := &monitor{p: e.p, calls: sum(e.p.px.UpstreamCalls()), stop: make(chan struct{}), done: make(chan struct{})}
	e.t.Cleanup(m.halt) // a test that fails half-way
	go func() {
		defer close(m.done)
		t := time.NewTicker(isoSample)
		defer t.Stop()
		for {
			m.sample()
			select {
			case <-m.stop:
				m.sample()
				return
			case <-t.C:
			}
		}
	}()
	return m
}

func (m *monitor) sample() {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	m.res.peakHeap = max(m.res.peakHeap, ms.HeapInuse)
	if rss, err := bench.ResidentBytes(os.Getpid()); err == nil {
		m.res.peakRSS = max(m.res.peakRSS, uint64(rss))
	}
	m.res.maxConnects = max(m.res.maxConnects, m.p.px.UpstreamConnects())
	m.res.samples++
}

func (m *monitor) halt() {
	m.once.Do(func() { close(m.stop) })
	<-m.done
}

// end stops sampling and returns what was seen.
func (m *monitor) end() monResult {
	m.halt()
	m.res.connectsAfter = m.p.px.UpstreamConnects()
	m.res.upstreamStreams = sum(m.p.px.UpstreamCalls()) - m.calls
	return m.res
}

func sum(xs []uint64) uint64 {
	var n uint64
	for _, x := range xs {
		n += x
	}
	return n
}

// --- the good client -----------------------------------------------------

// goodFunc is call number i of the good client.
type goodFunc func(ctx context.Context, i int) error

// goodLoad is a call made at rate per second beside the Echo calls.
type goodLoad struct {
	call   goodFunc
	rate   float64
	result goodResult
}

func echoCall(cc grpc.ClientConnInterface) goodFunc {
	client := pb.NewEchoServiceClient(cc)
	return func(ctx context.Context, i int) error {
		msg := fmt.Appendf(nil, "good call %d", i)
		resp, err := client.Echo(ctx, &pb.EchoRequest{Payload: msg})
		if err != nil {
			return err
		}
		if !bytes.Equal(resp.GetPayload(), msg) {
			return fmt.Errorf("%w: Echo answered %q to %q", errWrong, resp.GetPayload(), msg)
		}
		return nil
	}
}

// healthCheckCall asks the proxy's own health service for "": it must say
// SERVING.
func healthCheckCall(cc grpc.ClientConnInterface) goodFunc {
	client := healthpb.NewHealthClient(cc)
	return func(ctx context.Context, _ int) error {
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			return err
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("%w: health \"\" is %s", errWrong, resp.GetStatus())
		}
		return nil
	}
}

// goodResult is what the good client saw in one window.
type goodResult struct {
	window   time.Duration
	issued   int
	ok       int
	errs     map[string]int // by code ("wrong answer" for an OK that was wrong)
	firstErr map[string]string
	lat      []time.Duration // of the calls that succeeded, sorted
	elapsed  time.Duration   // from the first call's start to the last one's end
}

func (r goodResult) failed() int { return r.issued - r.ok }

func (r goodResult) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.ok) / r.elapsed.Seconds()
}

// pct is the q-quantile of the successful calls' latencies.
func (r goodResult) pct(q float64) time.Duration {
	if len(r.lat) == 0 {
		return 0
	}
	i := int(q*float64(len(r.lat))+0.999999) - 1
	return r.lat[min(max(i, 0), len(r.lat)-1)]
}

func (r goodResult) p99() time.Duration { return r.pct(0.99) }

func (r goodResult) errString() string {
	var parts []string
	for k, n := range r.errs {
		parts = append(parts, fmt.Sprintf("%s=%d (first: %s)", k, n, r.firstErr[k]))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

func (r goodResult) String() string {
	s := fmt.Sprintf("%d calls in %s, %d ok (%.1f/s), p50 %s p99 %s max %s",
		r.issued, r.elapsed.Round(time.Millisecond), r.ok, r.rate(),
		r.pct(0.5).Round(10*time.Microsecond), r.p99().Round(10*time.Microsecond), r.pct(1).Round(10*time.Microsecond))
	if r.failed() > 0 {
		s += "; failed: " + r.errString()
	}
	return s
}

// openLoop makes call at rate per second for window, on a fixed schedule
// whatever the answers take (open loop: a slow answer does not delay the
// next call), each call with its own deadline, and waits for them all.
func openLoop(call goodFunc, rate float64, window time.Duration) goodResult {
	interval := time.Duration(float64(time.Second) / rate)
	r := goodResult{window: window, errs: map[string]int{}, firstErr: map[string]string{}}
	var (
		mu      sync.Mutex
		wg      sync.WaitGroup
		lastEnd time.Time
	)
	start := time.Now()
	for i := 0; ; i++ {
		at := start.Add(time.Duration(i) * interval)
		if at.Sub(start) >= window {
			break
		}
		if d := time.Until(at); d > 0 {
			time.Sleep(d)
		}
		r.issued++
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), isoGoodDeadline)
			t0 := time.Now()
			err := call(ctx, i)
			end := time.Now()
			cancel()
			mu.Lock()
			defer mu.Unlock()
			if end.After(lastEnd) {
				lastEnd = end
			}
			if err == nil {
				r.ok++
				r.lat = append(r.lat, end.Sub(t0))
				return
			}
			k := status.Code(err).String()
			if errors.Is(err, errWrong) {
				k = "wrong answer"
			}
			r.errs[k]++
			if _, ok := r.firstErr[k]; !ok {
				r.firstErr[k] = err.Error()
			}
		}()
	}
	wg.Wait()
	r.elapsed = max(lastEnd.Sub(start), window)
	sort.Slice(r.lat, func(i, j int) bool { return r.lat[i] < r.lat[j] })
	return r
}

// --- a raw attacking HTTP/2 client -----------------------------------------

// rawClient is an attacker's HTTP/2 connection. Unlike h2 it writes frames
// in batches through a buffer (one socket write per batch, nothing waits
// for the server), keeps tallies rather than a record per stream (an attack
// opens hundreds of thousands), tracks the proxy's flow-control windows for
// the attacks that respect them, and can be deaf: never read its socket.
type rawClient struct {
	conn net.Conn

	wmu  sync.Mutex // guards the write side below
	bw   *bufio.Writer
	wfr  *http2.Framer // writes into bw
	henc *hpack.Encoder
	hbuf bytes.Buffer
	next uint32 // next stream id
	werr error  // the first write error: the connection is done
	// mute: batch writes no SETTINGS acknowledgement nor PING answer (they
	// would break a header block the attack keeps open).
	mute bool

	mu      sync.Mutex // guards the read side below
	rs      rawState
	peerWin int64            // the proxy's SETTINGS_INITIAL_WINDOW_SIZE
	connWin int64            // connection send window
	sent    map[uint32]int64 // DATA bytes sent per stream (flow-controlled sends)
	credit  map[uint32]int64 // WINDOW_UPDATE increments per stream
	acks    int              // SETTINGS to acknowledge
	pongs   [][8]byte        // PINGs to answer
	changed chan struct{}    // closed and replaced when any of the above changes
	done    chan struct{}    // closed when the reader has exited
	closeMu sync.Once
}

// rawState is what the proxy sent on the connection.
type rawState struct {
	heads    int           // response HEADERS that do not end their stream
	ended    int           // streams ended by the proxy (HEADERS or DATA with END_STREAM)
	rsts     int           // RST_STREAM frames
	pingAcks int           // PING acknowledgements
	goaway   *goAwayReport // the first GOAWAY
	closed   error         // the reader saw the connection end
	statuses map[int]int   // grpc-status of ended streams; -2: an HTTP error status without one
}

// rawOpts tune dialRaw.
type rawOpts struct {
	// settings follow the preface. nil: a 1 GiB initial window, so that
	// nothing the proxy sends is ever held up by flow control (as newH2).
	settings []http2.Setting
	// zeroWindow sends settings as they are and no connection
	// WINDOW_UPDATE; otherwise the connection window is raised by 1 GiB.
	zeroWindow bool
	// deaf: the client never reads its socket (no reader goroutine, a
	// small receive buffer): whatever the proxy sends piles up.
	deaf bool
}

var errNoWindow = errors.New("the proxy gave no flow-control window in time")

// dialRaw connects to addr and sends the client preface and settings. It
// does not wait for the proxy.
func dialRaw(addr string, o rawOpts) (*rawClient, error) {
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if tc, ok := nc.(*net.TCPConn); ok && o.deaf {
		_ = tc.SetReadBuffer(4 << 10)
	}
	c := &rawClient{conn: nc, next: 1, peerWin: 65535, connWin: 65535,
		sent: map[uint32]int64{}, credit: map[uint32]int64{},
		changed: make(chan struct{}), done: make(chan struct{})}
	c.rs.statuses = map[int]int{}
	c.bw = bufio.NewWriterSize(nc, 64<<10)
	c.wfr = http2.NewFramer(c.bw, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	settings := o.settings
	if settings == nil && !o.zeroWindow {
		settings = []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1 << 30}}
	}
	_ = nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	err = c.batch(func() {
		_, _ = c.bw.WriteString(http2.ClientPreface)
		_ = c.wfr.WriteSettings(settings...)
		if !o.zeroWindow {
			_ = c.wfr.WriteWindowUpdate(0, 1<<30)
		}
	})
	_ = nc.SetWriteDeadline(time.Time{})
	if err != nil {
		_ = nc.Close()
		return nil, err
	}
	if o.deaf {
		close(c.done)
		return c, nil
	}
	rfr := http2.NewFramer(nil, nc)
	rfr.ReadMetaHeaders = hpack.NewDecoder(65536, nil)
	rfr.MaxHeaderListSize = 1 << 20
	rfr.SetMaxReadFrameSize(1 << 24)
	go c.read(rfr)
	return c, nil
}

// close closes the connection and waits for the reader.
func (c *rawClient) close() {
	c.closeMu.Do(func() { _ = c.conn.Close() })
	<-c.done
}

// batch runs fn, which writes frames with the methods below, then writes
// them to the socket at once. It returns the connection's first write
// error; after one, fn no longer runs.
func (c *rawClient) batch(fn func()) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	var (
		acks  int
		pongs [][8]byte
	)
	if !c.mute {
		c.mu.Lock()
		acks, pongs = c.acks, c.pongs
		c.acks, c.pongs = 0, nil
		c.mu.Unlock()
	}
	for range acks {
		_ = c.wfr.WriteSettingsAck()
	}
	for _, p := range pongs {
		_ = c.wfr.WritePing(true, p)
	}
	fn()
	if err := c.bw.Flush(); err != nil {
		c.werr = err
	}
	return c.werr
}

// The frame writers: only inside batch.

// encode is fields as a header block of the connection's HPACK state.
func (c *rawClient) encode(fields []hpack.HeaderField) []byte {
	c.hbuf.Reset()
	for _, f := range fields {
		_ = c.henc.WriteField(f)
	}
	return c.hbuf.Bytes()
}

// headers opens the next stream with fields: HEADERS, and CONTINUATION
// frames when the block is larger than a frame.
func (c *rawClient) headers(fields []hpack.HeaderField, end bool) uint32 {
	id := c.next
	c.next += 2
	block := c.encode(fields)
	first := block[:min(len(block), isoFrame)]
	rest := block[len(first):]
	_ = c.wfr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndStream: end, EndHeaders: len(rest) == 0})
	for len(rest) > 0 {
		n := min(len(rest), isoFrame)
		_ = c.wfr.WriteContinuation(id, n == len(rest), rest[:n])
		rest = rest[n:]
	}
	return id
}

// data sends b on stream id in frames of at most isoFrame bytes, without
// looking at flow control.
func (c *rawClient) data(id uint32, b []byte, end bool) {
	for {
		n := min(len(b), isoFrame)
		_ = c.wfr.WriteData(id, end && n == len(b), b[:n])
		b = b[n:]
		if len(b) == 0 {
			return
		}
	}
}

func (c *rawClient) ping() { _ = c.wfr.WritePing(false, [8]byte{'a', 't', 't', 'a', 'c', 'k'}) }

// sendFlow sends b on stream id as the proxy's windows allow (END_STREAM
// with the last byte when end), waiting for its WINDOW_UPDATEs until
// deadline. Not inside batch.
func (c *rawClient) sendFlow(id uint32, b []byte, end bool, deadline time.Time) error {
	for {
		c.mu.Lock()
		if c.rs.closed != nil {
			err := c.rs.closed
			c.mu.Unlock()
			return err
		}
		n := min(int64(len(b)), c.connWin, c.peerWin+c.credit[id]-c.sent[id], isoFrame)
		if n <= 0 && len(b) > 0 {
			ch := c.changed
			c.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-time.After(time.Until(deadline)):
				return errNoWindow
			}
		}
		c.connWin -= n
		c.sent[id] += n
		c.mu.Unlock()
		chunk := b[:n]
		b = b[n:]
		last := len(b) == 0
		if err := c.batch(func() { _ = c.wfr.WriteData(id, end && last, chunk) }); err != nil {
			return err
		}
		if last {
			return nil
		}
	}
}

func (c *rawClient) read(fr *http2.Framer) {
	defer close(c.done)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				continue
			}
			c.mu.Lock()
			c.rs.closed = err
			c.signalLocked()
			c.mu.Unlock()
			return
		}
		c.mu.Lock()
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
					c.peerWin = int64(v)
				}
				c.acks++
				c.signalLocked()
			}
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				c.connWin += int64(f.Increment)
			} else {
				c.credit[f.StreamID] += int64(f.Increment)
			}
			c.signalLocked()
		case *http2.PingFrame:
			if f.IsAck() {
				c.rs.pingAcks++
				c.signalLocked()
			} else if len(c.pongs) < 16 {
				c.pongs = append(c.pongs, f.Data)
			}
		case *http2.MetaHeadersFrame:
			if !f.StreamEnded() {
				c.rs.heads++
				break
			}
			c.rs.ended++
			st := -1
			if v := f.PseudoValue("status"); v != "" && v != "200" {
				st = -2 // an HTTP error status
			}
			for _, hf := range f.RegularFields() {
				if hf.Name == "grpc-status" {
					_, _ = fmt.Sscan(hf.Value, &st)
				}
			}
			c.rs.statuses[st]++
			c.signalLocked()
		case *http2.DataFrame:
			if f.StreamEnded() {
				c.rs.ended++
				c.signalLocked()
			}
		case *http2.RSTStreamFrame:
			c.rs.rsts++
			c.signalLocked()
		case *http2.GoAwayFrame:
			if c.rs.goaway == nil {
				c.rs.goaway = &goAwayReport{Code: f.ErrCode, Debug: string(f.DebugData()), LastID: f.LastStreamID}
			}
			c.signalLocked()
		}
		c.mu.Unlock()
	}
}

func (c *rawClient) signalLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// state is a copy of what the proxy sent so far.
func (c *rawClient) state() rawState {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.rs
	s.statuses = make(map[int]int, len(c.rs.statuses))
	for k, v := range c.rs.statuses {
		s.statuses[k] = v
	}
	if c.rs.goaway != nil {
		g := *c.rs.goaway
		s.goaway = &g
	}
	return s
}

// report is what the proxy sent, for the attack's report.
func (c *rawClient) report() connReport {
	s := c.state()
	return connReport{Heads: s.heads, Ended: s.ended, RSTs: s.rsts, PingAcks: s.pingAcks,
		Statuses: s.statuses, GoAway: s.goaway, Closed: c.ended()}
}

// waitFor waits until cond holds on what the proxy sent, or timeout; it
// reports whether cond held.
func (c *rawClient) waitFor(timeout time.Duration, cond func(rawState) bool) bool {
	deadline := time.After(timeout)
	for {
		c.mu.Lock()
		ok := cond(c.rs)
		ch := c.changed
		c.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ch:
		case <-deadline:
			return false
		}
	}
}

// ended reports whether the proxy closed the connection: the reader saw it
// end, or (deaf) a write failed for another reason than its deadline.
func (c *rawClient) ended() bool {
	c.mu.Lock()
	closed := c.rs.closed != nil
	c.mu.Unlock()
	if closed {
		return true
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.werr != nil && !errors.Is(c.werr, os.ErrDeadlineExceeded)
}

// waitEnded waits up to timeout for the proxy to close the connection.
func (c *rawClient) waitEnded(timeout time.Duration) bool {
	if c.waitFor(timeout, func(s rawState) bool { return s.closed != nil }) {
		return true
	}
	return c.ended()
}

// sync sends a PING and waits until it is answered: the proxy has then
// read every frame sent before it.
func (c *rawClient) sync(timeout time.Duration) error {
	before := c.state().pingAcks
	if err := c.batch(c.ping); err != nil {
		return err
	}
	if !c.waitFor(timeout, func(s rawState) bool { return s.pingAcks > before || s.closed != nil }) {
		return fmt.Errorf("PING not answered within %s", timeout)
	}
	if s := c.state(); s.closed != nil {
		return fmt.Errorf("connection closed: %v (%s)", s.closed, s.goaway)
	}
	return nil
}

// --- the attacks ---------------------------------------------------------

// attackReport is what an attack did and what the proxy answered. The
// attacker process sends it to the test as JSON.
type attackReport struct {
	Attack   string
	Conns    int            // connections opened
	Sent     int            // what the attack counts: streams, frames, header blocks, rounds, calls
	Cut      int            // connections the proxy ended (GOAWAY, close)
	Stalled  int            // connections whose sending stopped: no window, or the proxy stopped reading
	Answered int            // streams the proxy answered (response headers or their end)
	GoAways  []goAwayReport // the first GOAWAY of every connection that got one
	Last     connReport     // what the proxy sent on the last connection
	Err      string         // the attack itself failed (could not connect, ...)
}

// goAwayReport is a GOAWAY the proxy sent.
type goAwayReport struct {
	Code   http2.ErrCode
	Debug  string
	LastID uint32
}

func (g *goAwayReport) String() string {
	if g == nil {
		return "no GOAWAY"
	}
	return fmt.Sprintf("GOAWAY %s %q (last stream %d)", g.Code, g.Debug, g.LastID)
}

// connReport is what the proxy sent on one connection.
type connReport struct {
	Heads, Ended, RSTs, PingAcks int
	Statuses                     map[int]int // grpc-status of the streams ended; -2: an HTTP error status without one
	GoAway                       *goAwayReport
	Closed                       bool // the proxy closed the connection
}

func (c connReport) String() string {
	return fmt.Sprintf("%d response headers, %d streams ended (grpc-status %v), %d RST_STREAM, %d PING acks, %s, closed %v",
		c.Heads, c.Ended, c.Statuses, c.RSTs, c.PingAcks, c.GoAway, c.Closed)
}

func (r attackReport) String() string {
	// GOAWAYs by code and reason, with the range of streams before them.
	type span struct{ n, lo, hi uint32 }
	byKind := map[string]*span{}
	var kinds []string
	for _, g := range r.GoAways {
		k := fmt.Sprintf("%s %q", g.Code, g.Debug)
		sp, ok := byKind[k]
		if !ok {
			sp = &span{lo: g.LastID, hi: g.LastID}
			byKind[k] = sp
			kinds = append(kinds, k)
		}
		sp.n++
		sp.lo, sp.hi = min(sp.lo, g.LastID), max(sp.hi, g.LastID)
	}
	var gs []string
	for _, k := range kinds {
		sp := byKind[k]
		gs = append(gs, fmt.Sprintf("%d x %s after %d-%d streams", sp.n, k, (sp.lo+1)/2, (sp.hi+1)/2))
	}
	s := fmt.Sprintf("%s: %d sent on %d connections, %d ended by the proxy (GOAWAYs: [%s])",
		r.Attack, r.Sent, r.Conns, r.Cut, strings.Join(gs, "; "))
	if r.Answered > 0 || r.Stalled > 0 {
		s += fmt.Sprintf(", %d answered, %d connections stalled", r.Answered, r.Stalled)
	}
	s += "; last connection: " + r.Last.String()
	if r.Err != "" {
		s += "; attack error: " + r.Err
	}
	return s
}

// gotGoAway reports whether the last connection was sent GOAWAY code with
// debug (any debug when empty).
func (r attackReport) gotGoAway(code http2.ErrCode, debug string) bool {
	g := r.Last.GoAway
	return g != nil && g.Code == code && (debug == "" || g.Debug == debug)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// rapidReset opens unary Echo streams and resets them at once
// (RST_STREAM CANCEL), in a tight loop, never ending a request: every
// other stream sends its whole request message first, but no END_STREAM.
// When the proxy sends GOAWAY or closes the connection, it opens the next,
// up to maxConns. It stops after maxStreams in all or at until, and gives
// the proxy settle to answer (GOAWAY, close) what it sent last.
func rapidReset(addr string, maxConns, maxStreams int, until time.Time, settle time.Duration) attackReport {
	const batchSize = 64
	r := attackReport{Attack: "rapid reset"}
	fields := grpcHeaders(echoPath)
	msg := grpcFrame(mustMarshal(&pb.EchoRequest{Payload: []byte("reset me")}))
	for r.Conns < maxConns && r.Sent < maxStreams && time.Now().Before(until) {
		c, err := dialRaw(addr, rawOpts{})
		if err != nil {
			r.Err = err.Error()
			return r
		}
		r.Conns++
		_ = c.conn.SetWriteDeadline(until)
		for r.Sent < maxStreams && time.Now().Before(until) && !c.ended() && c.state().goaway == nil {
			n := min(batchSize, maxStreams-r.Sent)
			if c.batch(func() {
				for k := range n {
					id := c.headers(fields, false)
					if k%2 == 1 {
						c.data(id, msg, false)
					}
					_ = c.wfr.WriteRSTStream(id, http2.ErrCodeCancel)
				}
			}) != nil {
				break
			}
			r.Sent += n
		}
		// Let the reader reach the end of what the proxy sent (a write
		// may fail on the proxy's close before the GOAWAY is read).
		c.waitEnded(settle)
		r.Last = c.report()
		if r.Last.GoAway != nil {
			r.GoAways = append(r.GoAways, *r.Last.GoAway)
		}
		if r.Last.GoAway != nil || r.Last.Closed {
			r.Cut++
		}
		c.close()
	}
	return r
}

// settingsFlood opens conns connections that never read and floods them
// with SETTINGS frames (each needing an acknowledgement the client never
// reads; every one changes the initial window, the HPACK table size and
// the frame size); every other connection adds a PING to every 512
// SETTINGS. It stops at until.
func settingsFlood(addr string, conns int, until time.Time) attackReport {
	var (
		mu sync.Mutex
		r  = attackReport{Attack: "SETTINGS and PING flood", Conns: conns}
		wg sync.WaitGroup
	)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dialRaw(addr, rawOpts{deaf: true})
			if err != nil {
				mu.Lock()
				r.Err = err.Error()
				mu.Unlock()
				return
			}
			defer c.close()
			_ = c.conn.SetWriteDeadline(until)
			frames := 0
			for k := uint32(0); time.Now().Before(until); k++ {
				if c.batch(func() {
					for j := range uint32(512) {
						v := (k*512 + j) % 2
						_ = c.wfr.WriteSettings(
							http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<30 - v},
							http2.Setting{ID: http2.SettingHeaderTableSize, Val: 4096 - v},
							http2.Setting{ID: http2.SettingMaxFrameSize, Val: isoFrame + v},
						)
					}
					frames += 512
					if i%2 == 1 {
						c.ping()
						frames++
					}
				}) != nil {
					break
				}
			}
			mu.Lock()
			defer mu.Unlock()
			r.Sent += frames
			if c.ended() {
				r.Cut++
			}
		}()
	}
	wg.Wait()
	return r
}

// healthWatches opens n grpc.health.v1.Health/Watch streams for service ""
// on one connection and leaves them open. It returns once the proxy has
// read them all (a PING sent after them is answered; stalled: not within 5
// seconds, the proxy stopped reading) and answered what it will within a
// second. It returns how many it sent. The caller closes the connection.
func healthWatches(addr string, n int) (c *rawClient, sent int, stalled bool, err error) {
	if c, err = dialRaw(addr, rawOpts{}); err != nil {
		return nil, 0, false, err
	}
	_ = c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	fields := grpcHeaders(watchPath)
	for sent < n {
		k := min(100, n-sent)
		if c.batch(func() {
			for range k {
				id := c.headers(fields, false)
				c.data(id, grpcFrame(nil), true)
			}
		}) != nil {
			return c, sent, true, nil
		}
		sent += k
	}
	if c.sync(5*time.Second) != nil {
		return c, sent, true, nil
	}
	c.waitFor(time.Second, func(s rawState) bool { return s.heads+s.ended+s.rsts >= n })
	return c, sent, false, nil
}

// pingsWithMalformed sends, in a loop, a request the proxy answers itself
// (content-type application/json: HTTP 415) and a PING, so the proxy
// always has just written something when the PING comes. It stops when the
// proxy closes the connection, after rounds or at until, and waits up to a
// second for the close.
func pingsWithMalformed(addr string, rounds int, until time.Time) attackReport {
	r := attackReport{Attack: "PINGs between malformed requests", Conns: 1}
	c, err := dialRaw(addr, rawOpts{})
	if err != nil {
		r.Err = err.Error()
		return r
	}
	defer c.close()
	_ = c.conn.SetWriteDeadline(until)
	fields := grpcHeaders(echoPath, hf("content-type", "application/json"))
	for r.Sent < rounds && time.Now().Before(until) && !c.ended() {
		k := min(8, rounds-r.Sent)
		if c.batch(func() {
			for range k {
				c.headers(fields, true)
				c.ping()
			}
		}) != nil {
			break
		}
		r.Sent += k
	}
	c.waitEnded(time.Second)
	r.Last = c.report()
	if r.Last.Closed || r.Last.GoAway != nil {
		r.Cut = 1
	}
	return r
}

// headerOnlyStreams opens, on each of conns connections, perConn unary
// Echo streams with HEADERS only: no DATA, no END_STREAM. It returns once
// the proxy has read them all (stalled: the connections on which a PING
// sent after them was not answered within 5 seconds, the proxy stopped
// reading). The caller closes the connections.
func headerOnlyStreams(addr string, conns, perConn int) (cs []*rawClient, stalled int, err error) {
	fields := grpcHeaders(echoPath)
	for range conns {
		c, err := dialRaw(addr, rawOpts{})
		if err != nil {
			return cs, stalled, err
		}
		cs = append(cs, c)
		_ = c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if c.batch(func() {
			for range perConn {
				c.headers(fields, false)
			}
		}) != nil || c.sync(5*time.Second) != nil {
			stalled++
		}
	}
	return cs, stalled, nil
}

// continuationFlood sends the HEADERS of a unary Echo without END_HEADERS,
// then empty CONTINUATION frames that never end the header block (an
// empty fragment adds nothing, so x/net/http2's size guard never trips).
// It acknowledges the proxy's SETTINGS first and then sends nothing else:
// any other frame in a header block is a protocol error. It stops when the
// proxy closes the connection, after maxFrames or at until, and waits up
// to a second for the close.
func continuationFlood(addr string, maxFrames int, until time.Time) attackReport {
	r := attackReport{Attack: "CONTINUATION flood", Conns: 1}
	c, err := dialRaw(addr, rawOpts{})
	if err != nil {
		r.Err = err.Error()
		return r
	}
	defer c.close()
	if err := c.sync(5 * time.Second); err != nil {
		r.Err = err.Error()
		return r
	}
	_ = c.conn.SetWriteDeadline(until)
	if err := c.batch(func() {
		c.mute = true
		block := c.encode(grpcHeaders(echoPath))
		_ = c.wfr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndStream: true, EndHeaders: false})
		c.next = 3
	}); err != nil {
		r.Err = "writing the HEADERS: " + err.Error()
		return r
	}
	r.Sent = 1
	for r.Sent < maxFrames && time.Now().Before(until) && !c.ended() {
		n := min(1024, maxFrames-r.Sent)
		if c.batch(func() {
			for range n {
				_ = c.wfr.WriteContinuation(1, false, nil)
			}
		}) != nil {
			break
		}
		r.Sent += n
	}
	c.waitEnded(time.Second)
	r.Last = c.report()
	if r.Last.Closed || r.Last.GoAway != nil {
		r.Cut = 1
	}
	return r
}

// hpackFlood sends complete unary Echo requests (END_STREAM on HEADERS)
// whose header blocks each insert a new ~3 KB literal into the HPACK
// dynamic table (evicting the previous one) and reference it nine times
// more: about 3 KB on the wire, 30 KB decoded, under the header list limit
// (32 KiB) but over the metadata limit (16 KiB), so the proxy decodes each
// in full and answers it itself (ResourceExhausted). It stops when the
// proxy closes the connection, after maxBlocks or at until, and waits up
// to a second for the close.
func hpackFlood(addr string, maxBlocks int, until time.Time) attackReport {
	r := attackReport{Attack: "HPACK flood", Conns: 1}
	c, err := dialRaw(addr, rawOpts{})
	if err != nil {
		r.Err = err.Error()
		return r
	}
	defer c.close()
	_ = c.conn.SetWriteDeadline(until)
	base := strings.Repeat("hpack-flood-", 249) // 2988 bytes
	for r.Sent < maxBlocks && time.Now().Before(until) && !c.ended() {
		n := min(16, maxBlocks-r.Sent)
		if c.batch(func() {
			for k := range n {
				v := fmt.Sprintf("%s%08d", base, r.Sent+k)
				fields := grpcHeaders(echoPath)
				for range 10 {
					fields = append(fields, hf("x-flood", v))
				}
				c.headers(fields, true)
			}
		}) != nil {
			break
		}
		r.Sent += n
	}
	c.waitEnded(time.Second)
	r.Last = c.report()
	if r.Last.Closed || r.Last.GoAway != nil {
		r.Cut = 1
	}
	return r
}

// bigCallers make unary Echo calls with a 64 KiB payload, and hold their
// connections until stopped.
type bigCallers struct {
	sent    sync.WaitGroup // every connection has sent what it will
	done    sync.WaitGroup
	release chan struct{}
	mu      sync.Mutex
	res     attackReport
}

// startBigCalls makes calls calls on each of conns connections, as fast
// as the proxy takes them, until until. zeroWindow: the client advertises
// SETTINGS_INITIAL_WINDOW_SIZE 0 and never sends a WINDOW_UPDATE, so no
// response byte can reach it; it sends its requests as the proxy's windows
// allow. Otherwise the client is deaf: it never reads its socket and sends
// its requests without looking at windows (it cannot read them). A client
// stops sending when one call cannot go out within half a second (the
// proxy gives no window, or has stopped reading from it).
func startBigCalls(addr string, conns, calls int, zeroWindow bool, until time.Time) *bigCallers {
	const stall = 500 * time.Millisecond
	name := "64 KiB Echo calls from a client that never reads"
	if zeroWindow {
		name = "64 KiB Echo calls from a client that grants no window"
	}
	b := &bigCallers{release: make(chan struct{}), res: attackReport{Attack: name, Conns: conns}}
	body := grpcFrame(mustMarshal(&pb.EchoRequest{Payload: bytes.Repeat([]byte{'z'}, 64<<10)}))
	fields := grpcHeaders(echoPath)
	for range conns {
		b.sent.Add(1)
		b.done.Add(1)
		go func() {
			defer b.done.Done()
			sent := sync.OnceFunc(b.sent.Done)
			defer sent()
			o := rawOpts{deaf: true}
			if zeroWindow {
				o = rawOpts{zeroWindow: true, settings: []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 0}}}
			}
			c, err := dialRaw(addr, o)
			if err != nil {
				b.mu.Lock()
				b.res.Err = err.Error()
				b.mu.Unlock()
				return
			}
			defer c.close()
			done, stalled := 0, false
			for done < calls && time.Now().Before(until) && !stalled {
				deadline := time.Now().Add(stall)
				if deadline.After(until) {
					deadline = until
				}
				_ = c.conn.SetWriteDeadline(deadline)
				var err error
				if zeroWindow {
					var id uint32
					if err = c.batch(func() { id = c.headers(fields, false) }); err == nil {
						err = c.sendFlow(id, body, true, deadline)
					}
				} else {
					err = c.batch(func() { c.data(c.headers(fields, false), body, true) })
				}
				if err != nil {
					stalled = errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, errNoWindow)
					break
				}
				done++
			}
			if zeroWindow {
				c.waitFor(time.Second, func(s rawState) bool { return s.heads+s.ended+s.rsts >= done || s.closed != nil })
			}
			sent()
			<-b.release
			rep := c.report()
			b.mu.Lock()
			defer b.mu.Unlock()
			b.res.Sent += done
			b.res.Answered += rep.Heads + rep.Ended
			b.res.Last = rep
			if stalled {
				b.res.Stalled++
			}
			if rep.Closed || rep.GoAway != nil {
				b.res.Cut++
			}
		}()
	}
	return b
}

// waitSent waits until every connection has sent what it will.
func (b *bigCallers) waitSent() { b.sent.Wait() }

// stop closes the connections and returns what they did and got.
func (b *bigCallers) stop() attackReport {
	close(b.release)
	b.done.Wait()
	return b.res
}

// --- the attacker process ---------------------------------------------------

// Every attack runs in its own process (this test binary again, running
// TestIsolationAttackerProcess), as from another host: the attacker's
// tight loops then compete with the proxy for the machine's cores as
// another process would, through the kernel's scheduler, not for the test
// process's Go scheduler. Inside the test process, one goroutine spinning
// on nothing at all already pushes the good client's p99 from 5 ms to over
// 100 ms on a 2-core machine; in another process, two do not.

const (
	attackerEnv  = "NITROSIGN_ISOLATION_ATTACKER" // the attackSpec, as JSON
	readyLine    = "isolation-attacker: ready"
	resultPrefix = "isolation-attacker: result "
)

// attackSpec tells the attacker process what to do.
type attackSpec struct {
	Attack string
	Addr   string
	Conns  int
	// Count is the attack's bound in streams, frames, header blocks,
	// rounds or watches; in calls per connection for header-only streams
	// and big calls.
	Count int
	// Duration bounds a flood from when it starts, or the setup of an
	// attack that holds what it opened.
	Duration time.Duration
	// Settle: rapid reset waits this long for the proxy's answer (GOAWAY)
	// to the last streams of each connection.
	Settle time.Duration
	// HoldMax bounds how long a holding attack waits for the test to let
	// go (it closes the process's stdin).
	HoldMax time.Duration
}

// held reports whether the attack sets up, then holds what it opened
// until the test lets go, rather than flooding for its Duration.
func (s attackSpec) held() bool {
	switch s.Attack {
	case "health-watches", "header-only", "zero-window", "deaf":
		return true
	}
	return false
}

// runAttack runs s; ready is called once the attack is under way (a
// holding one: set up), hold returns when the test lets go.
func runAttack(s attackSpec, ready, hold func()) attackReport {
	until := time.Now().Add(s.Duration)
	switch s.Attack {
	case "rapid-reset":
		ready()
		return rapidReset(s.Addr, s.Conns, s.Count, until, s.Settle)
	case "settings-flood":
		ready()
		return settingsFlood(s.Addr, s.Conns, until)
	case "ping-flood":
		ready()
		return pingsWithMalformed(s.Addr, s.Count, until)
	case "continuation-flood":
		ready()
		return continuationFlood(s.Addr, s.Count, until)
	case "hpack-flood":
		ready()
		return hpackFlood(s.Addr, s.Count, until)
	case "health-watches":
		r := attackReport{Attack: "health Watch streams held open", Conns: 1}
		c, sent, stalled, err := healthWatches(s.Addr, s.Count)
		r.Sent, r.Err = sent, errString(err)
		if stalled {
			r.Stalled = 1
		}
		if c != nil {
			defer c.close()
			ready()
			hold()
			r.Last = c.report()
			r.Answered = r.Last.Heads + r.Last.Ended
		}
		return r
	case "header-only":
		r := attackReport{Attack: "header-only streams held open", Conns: s.Conns, Sent: s.Conns * s.Count}
		cs, stalled, err := headerOnlyStreams(s.Addr, s.Conns, s.Count)
		r.Err, r.Stalled = errString(err), stalled
		ready()
		hold()
		for _, c := range cs {
			r.Last = c.report()
			if r.Last.Closed || r.Last.GoAway != nil {
				r.Cut++
			}
			c.close()
		}
		return r
	case "zero-window", "deaf":
		b := startBigCalls(s.Addr, s.Conns, s.Count, s.Attack == "zero-window", until)
		b.waitSent()
		ready()
		hold()
		return b.stop()
	}
	return attackReport{Attack: s.Attack, Err: "unknown attack"}
}

// TestIsolationAttackerProcess is not a test of its own: it is the
// attacker process of the TestIsolation tests, which start it with the
// attack in NITROSIGN_ISOLATION_ATTACKER. It prints readyLine once the
// attack is under way, holds what it opened (if it does) until its stdin
// closes, and prints its report as JSON after resultPrefix.
func TestIsolationAttackerProcess(t *testing.T) {
	raw := os.Getenv(attackerEnv)
	if raw == "" {
		t.Skip("the attacker process of the TestIsolation tests: runs only when one of them starts it")
	}
	var s attackSpec
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		t.Fatalf("%s: %v", attackerEnv, err)
	}
	ready := sync.OnceFunc(func() { fmt.Println(readyLine) })
	hold := func() {
		released := make(chan struct{})
		go func() {
			defer close(released)
			_, _ = io.Copy(io.Discard, os.Stdin)
		}()
		select {
		case <-released:
		case <-time.After(s.HoldMax):
		}
	}
	rep := runAttack(s, ready, hold)
	ready()
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println(resultPrefix + string(b))
}

// attacker is a running attacker process.
type attacker struct {
	spec   attackSpec
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr bytes.Buffer  // read once exited is closed
	ready  chan struct{} // closed when the attack is under way
	result chan attackReport
	exited chan struct{}
	err    error // of the process; set before exited is closed
}

// startAttacker starts the attack s against the proxy in its own process;
// the test's cleanup kills it if it is still running.
func (e *isoEnv) startAttacker(s attackSpec) *attacker {
	t := e.t
	t.Helper()
	s.Addr = e.p.addr
	if s.HoldMax == 0 {
		s.HoldMax = 2 * time.Minute
	}
	spec, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	a := &attacker{spec: s, ready: make(chan struct{}), result: make(chan attackReport, 1), exited: make(chan struct{})}
	a.cmd = exec.Command(os.Args[0], "-test.run=^TestIsolationAttackerProcess$", "-test.timeout=15m")
	a.cmd.Env = append(os.Environ(), attackerEnv+"="+string(spec))
	a.cmd.Stderr = &a.stderr
	stdout, err := a.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if a.stdin, err = a.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := a.cmd.Start(); err != nil {
		t.Fatalf("starting the attacker process: %v", err)
	}
	go func() {
		ready := sync.OnceFunc(func() { close(a.ready) })
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == readyLine:
				ready()
			case strings.HasPrefix(line, resultPrefix):
				var rep attackReport
				if err := json.Unmarshal([]byte(line[len(resultPrefix):]), &rep); err != nil {
					rep = attackReport{Attack: s.Attack, Err: "unreadable report: " + err.Error()}
				}
				a.result <- rep
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		a.err = a.cmd.Wait()
		close(a.exited)
	}()
	t.Cleanup(func() {
		_ = a.stdin.Close()
		select {
		case <-a.exited:
		case <-time.After(10 * time.Second):
			_ = a.cmd.Process.Kill()
			<-a.exited
		}
	})
	return a
}

// waitReady waits until the attack is under way.
func (a *attacker) waitReady(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-a.ready:
	case <-a.exited:
		t.Fatalf("the attacker process (%s) exited before its attack was under way: %v\n%s", a.spec.Attack, a.err, a.stderr.String())
	case <-time.After(timeout):
		t.Fatalf("the attacker process (%s) was not under way within %s", a.spec.Attack, timeout)
	}
}

// finish lets go of what the attack holds, waits for the process to end
// (it ends by itself) and returns its report.
func (a *attacker) finish(t *testing.T) attackReport {
	t.Helper()
	_ = a.stdin.Close()
	timeout := a.spec.Duration + a.spec.Settle + 30*time.Second
	select {
	case <-a.exited:
	case <-time.After(timeout):
		t.Fatalf("the attacker process (%s) did not end within %s", a.spec.Attack, timeout)
	}
	select {
	case rep := <-a.result:
		if a.err != nil {
			t.Errorf("the attacker process (%s) failed: %v\n%s", a.spec.Attack, a.err, a.stderr.String())
		}
		return rep
	default:
		t.Fatalf("the attacker process (%s) ended without a report: %v\n%s", a.spec.Attack, a.err, a.stderr.String())
		return attackReport{}
	}
}

// run runs the attacks, each in its own process, and measures the good
// client while they go on: a flood for lead before the window opens and
// until it ends, an attack that holds what it opened from when it is set
// up until the window ends. It returns what the good client (and extra)
// saw, what the monitor saw from the start of the attacks to their end,
// and the attacks' reports.
//
// A window in which the good client had no failed call but missed a
// timing criterion (its rate or its p99, see check) is measured once more,
// under the same attack (a flood lasts one window longer for it), and the
// second window decides: these machines are shared, and a stall of the
// whole VM for a tenth of a second is enough to move the p99 of 125 calls.
// A proxy that does not isolate its clients misses both windows. Failed
// calls are never measured again.
func (e *isoEnv) run(specs []attackSpec, extra ...*goodLoad) (goodResult, monResult, []attackReport) {
	t := e.t
	t.Helper()
	m := e.monitor()
	var as []*attacker
	flood := false
	for _, s := range specs {
		if !s.held() {
			s.Duration += e.sz.window // room for a second window
		}
		as = append(as, e.startAttacker(s))
		flood = flood || !s.held()
	}
	for _, a := range as {
		a.waitReady(t, a.spec.Duration+30*time.Second)
	}
	if flood {
		time.Sleep(e.sz.lead)
	}
	good := e.goodWindow(extra...)
	if miss := e.timingMiss(good, extra); miss != "" {
		t.Logf("good client under attack, first window: %s", good)
		t.Logf("the good client %s in the first window with no failed call: measuring a second window under the same attack, which decides", miss)
		good = e.goodWindow(extra...)
	}
	var reps []attackReport
	for _, a := range as {
		rep := a.finish(t)
		t.Logf("attack: %s", rep)
		if rep.Err != "" {
			t.Errorf("the attack could not run as planned: %s", rep.Err)
		}
		reps = append(reps, rep)
	}
	return good, m.end(), reps
}

// --- the tests -------------------------------------------------------------

// TestIsolationRapidReset: rapid reset (CVE-2023-44487) on one client
// connection: the good client is served as before and the enclave does no
// work for the reset streams.
func TestIsolationRapidReset(t *testing.T) {
	e := newIsoEnv(t)
	good, mon, _ := e.run([]attackSpec{{Attack: "rapid-reset", Conns: 1, Count: e.sz.rapidStreams,
		Duration: e.sz.lead + e.sz.window, Settle: time.Second}})
	e.check(good, mon)
	e.checkNoUpstreamWork(good, mon, "rapid reset")
}

// TestIsolationRapidResetReconnect: rapid reset from a client that opens
// a new connection whenever the proxy ends one (up to 50 in the short
// version, 1000 in the long one, one after another) and so keeps
// attacking through the whole window.
func TestIsolationRapidResetReconnect(t *testing.T) {
	e := newIsoEnv(t)
	good, mon, _ := e.run([]attackSpec{{Attack: "rapid-reset", Conns: e.sz.rapidConns, Count: e.sz.rapidStreams,
		Duration: e.sz.lead + e.sz.window, Settle: time.Second}})
	e.check(good, mon)
	e.checkNoUpstreamWork(good, mon, "rapid reset")
}

// TestIsolationRapidResetGoAway: the proxy ends a rapid-reset connection
// with GOAWAY ENHANCE_YOUR_CALM once it has reset its budget of streams.
func TestIsolationRapidResetGoAway(t *testing.T) {
	e := newIsoEnv(t)
	good, mon, reps := e.run([]attackSpec{{Attack: "rapid-reset", Conns: 1, Count: e.sz.resetBudgetStreams,
		Duration: e.sz.lead + e.sz.window, Settle: 3 * time.Second}})
	e.check(good, mon)
	e.checkNoUpstreamWork(good, mon, "rapid reset")
	if r := reps[0]; !r.gotGoAway(http2.ErrCodeEnhanceYourCalm, "") {
		t.Errorf("after %d reset streams the attacker's connection got %s (closed %v), want GOAWAY ENHANCE_YOUR_CALM",
			r.Sent, r.Last.GoAway, r.Last.Closed)
	}
}

// TestIsolationSettingsFlood: connections that never read flood SETTINGS
// (and PINGs): the acknowledgements pile up for them, not for the others,
// and reading the flood does not starve the others.
func TestIsolationSettingsFlood(t *testing.T) {
	e := newIsoEnv(t)
	good, mon, _ := e.run([]attackSpec{{Attack: "settings-flood", Conns: e.sz.floodConns, Duration: e.sz.lead + e.sz.window}})
	e.check(good, mon)
}

// TestIsolationHealthWatch: one client holds many health Watch streams;
// the good client's health Check still answers SERVING, and its Echo calls
// are served as before.
func TestIsolationHealthWatch(t *testing.T) {
	e := newIsoEnv(t)
	check := &goodLoad{call: healthCheckCall(e.good), rate: 20}
	good, mon, _ := e.run([]attackSpec{{Attack: "health-watches", Count: e.sz.watches, Duration: 30 * time.Second}}, check)
	t.Logf("good health Check under attack: %s", check.result)
	e.check(good, mon)
	if n := check.result.failed(); n > 0 {
		t.Errorf("health Check of \"\" failed %d times of %d: %s", n, check.result.issued, check.result.errString())
	}
}

// TestIsolationPingFlood: PINGs interleaved with requests the proxy
// answers itself (so it has always just written something, which excuses
// a ping under grpc-go's policy) must still end with GOAWAY
// ENHANCE_YOUR_CALM "too_many_pings" after a few, not be answered by the
// thousand.
func TestIsolationPingFlood(t *testing.T) {
	const fewPings = 10 // grpc-go's policy: the third ping too early is the last
	e := newIsoEnv(t)
	good, mon, reps := e.run([]attackSpec{{Attack: "ping-flood", Count: e.sz.pingRounds, Duration: e.sz.lead + e.sz.window}})
	e.check(good, mon)
	r := reps[0]
	if !r.gotGoAway(http2.ErrCodeEnhanceYourCalm, "too_many_pings") || !r.Last.Closed {
		t.Errorf("after %d PINGs (%d answered) the connection got %s, closed %v; want GOAWAY ENHANCE_YOUR_CALM \"too_many_pings\" and a close",
			r.Sent, r.Last.PingAcks, r.Last.GoAway, r.Last.Closed)
	}
	if r.Last.PingAcks > fewPings {
		t.Errorf("the proxy answered %d PINGs of the flood, want at most %d", r.Last.PingAcks, fewPings)
	}
}

// TestIsolationHeaderOnlyStreams: 1024 unary streams that send HEADERS and
// never their request, on one connection (in the long version, on each of
// 4): the good client is served, and the enclave's slots are not taken by
// calls that may never come (the proxy opens a unary call upstream only
// once its request is complete).
func TestIsolationHeaderOnlyStreams(t *testing.T) {
	e := newIsoEnv(t)
	good, mon, _ := e.run([]attackSpec{{Attack: "header-only", Conns: e.sz.headerOnlyConns, Count: 1024, Duration: 30 * time.Second}})
	e.check(good, mon)
	e.checkNoUpstreamWork(good, mon, "header-only streams")
}

// TestIsolationContinuationFlood: a header block that never ends (endless
// empty CONTINUATION frames): the proxy closes that connection and serves
// the others as before.
func TestIsolationContinuationFlood(t *testing.T) {
	e := newIsoEnv(t)
	good, mon, reps := e.run([]attackSpec{{Attack: "continuation-flood", Count: e.sz.contFrames, Duration: e.sz.lead + e.sz.window}})
	e.check(good, mon)
	if r := reps[0]; r.Cut == 0 {
		t.Errorf("the proxy read %d frames of one unending header block and kept the connection open", r.Sent)
	}
}

// TestIsolationHPACKFlood: header blocks that churn the HPACK dynamic
// table and decode to 30 KB each, as fast as the client can send them:
// the proxy closes that connection and serves the others as before.
func TestIsolationHPACKFlood(t *testing.T) {
	e := newIsoEnv(t)
	good, mon, reps := e.run([]attackSpec{{Attack: "hpack-flood", Count: e.sz.hpackBlocks, Duration: e.sz.lead + e.sz.window}})
	e.check(good, mon)
	if r := reps[0]; r.Cut == 0 {
		t.Errorf("the proxy decoded %d flooding header blocks and kept the connection open", r.Sent)
	}
}

// TestIsolationZeroWindow: a client that grants no flow-control window
// (SETTINGS_INITIAL_WINDOW_SIZE 0, no WINDOW_UPDATE) and one that never
// reads make many Echo calls with 64 KiB messages, whose answers can never
// be delivered; then they hold them while the good client is measured.
// Their answers must neither crowd out the good client nor blow the memory
// budget. The calls are made before the window, not during it: uploading
// and echoing 64 KiB costs about 6 ms of the machine under -race, so the
// same calls from a well-behaved client, made during the window, slow the
// good client down as much (CPU, not isolation). The long version makes
// 5000 such calls on each side (5 connections of 1000).
func TestIsolationZeroWindow(t *testing.T) {
	e := newIsoEnv(t)
	spec := attackSpec{Conns: e.sz.bigConns, Count: e.sz.bigCalls, Duration: e.sz.bigSetup}
	zero, deaf := spec, spec
	zero.Attack, deaf.Attack = "zero-window", "deaf"
	good, mon, _ := e.run([]attackSpec{zero, deaf})
	e.check(good, mon)
}
