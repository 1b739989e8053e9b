package logship

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// host is a TCP receiver that collects lines; it can refuse connections
// (down) and can stop reading (stalled).
type host struct {
	t     *testing.T
	l     net.Listener
	mu    sync.Mutex
	lines []string
	conns []net.Conn
	wg    sync.WaitGroup
}

func newHost(t *testing.T) *host {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &host{t: t, l: l}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			h.mu.Lock()
			h.conns = append(h.conns, c)
			h.mu.Unlock()
			h.wg.Add(1)
			go func() {
				defer h.wg.Done()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					h.mu.Lock()
					h.lines = append(h.lines, sc.Text())
					h.mu.Unlock()
				}
			}()
		}
	}()
	t.Cleanup(h.close)
	return h
}

func (h *host) close() {
	_ = h.l.Close()
	h.mu.Lock()
	for _, c := range h.conns {
		_ = c.Close()
	}
	h.mu.Unlock()
	h.wg.Wait()
}

func (h *host) got() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.lines...)
}

func dialer(addr string) func(context.Context) (net.Conn, error) {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func closeShipper(t *testing.T, s *Shipper) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.Close(ctx)
}

// zap's JSON lines reach the host whole, in order, with their fields.
func TestLinesReachTheHost(t *testing.T) {
	h := newHost(t)
	s, err := New(Config{Dial: dialer(h.l.Addr().String())})
	if err != nil {
		t.Fatal(err)
	}
	defer closeShipper(t, s)
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), s, zap.DebugLevel)).Named("signer")
	for i := range 100 {
		log.Info("signed", zap.Int("n", i), zap.String("key_id", "k1"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "100 lines at the host", func() bool { return len(h.got()) == 100 })
	for i, l := range h.got() {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("line %d is not JSON: %q", i, l)
		}
		if m["msg"] != "signed" || m["n"] != float64(i) || m["logger"] != "signer" || m["key_id"] != "k1" {
			t.Fatalf("line %d: %v", i, m)
		}
	}
	if s.Shipped() != 100 || s.Dropped() != 0 {
		t.Errorf("shipped %d, dropped %d", s.Shipped(), s.Dropped())
	}
}

// With no host listening, Write never blocks: lines queue up to the
// bound, the rest are dropped and counted, and once a host listens it gets
// the queued lines after a notice of how many were lost.
func TestNoHostNeverBlocksAndCountsDrops(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close() // nothing listens yet
	s, err := New(Config{Dial: dialer(addr), MaxBuffer: 10 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer closeShipper(t, s)
	line := []byte(`{"level":"info","msg":"` + strings.Repeat("x", 90) + `"}` + "\n")
	start := time.Now()
	for range 1000 {
		if n, err := s.Write(line); n != len(line) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("1000 writes without a host took %v: Write blocks", d)
	}
	kept := (10 << 10) / len(line)
	if got := s.Dropped(); got != uint64(1000-kept) {
		t.Fatalf("dropped %d, want %d (the bound holds %d lines)", got, 1000-kept, kept)
	}
	// A host comes up on the same address.
	l2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("address %s taken meanwhile: %v", addr, err)
	}
	h := &host{t: t, l: l2}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		c, err := l2.Accept()
		if err != nil {
			return
		}
		h.mu.Lock()
		h.conns = append(h.conns, c)
		h.mu.Unlock()
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			h.mu.Lock()
			h.lines = append(h.lines, sc.Text())
			h.mu.Unlock()
		}
	}()
	t.Cleanup(h.close)
	_, _ = s.Write(line) // wakes the sender, which redials
	eventually(t, "the queued lines at the host", func() bool { return len(h.got()) >= kept })
	got := h.got()
	// The line that woke the sender found the queue full too.
	if !strings.Contains(got[0], "enclave log lines dropped") || !strings.Contains(got[0], `"dropped":`+itoa(1000-kept+1)) {
		t.Fatalf("first line is not the drop notice: %q", got[0])
	}
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func TestNewNeedsDial(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("New without Dial succeeded")
	}
}

// failingConn is a connection whose writes fail (a host that restarted:
// the first write on the old connection gets ECONNRESET).
type failingConn struct{ net.Conn }

func (failingConn) Write([]byte) (int, error) { return 0, errors.New("connection reset by peer") }

// Lines whose write failed go out again on a new connection: nothing is
// lost, and Flush says so.
func TestFailedWriteIsRetried(t *testing.T) {
	h := newHost(t)
	var dials atomic.Int32
	s, err := New(Config{Dial: func(ctx context.Context) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", h.l.Addr().String())
		if err == nil && dials.Add(1) == 1 {
			return failingConn{c}, nil
		}
		return c, err
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer closeShipper(t, s)
	for i := range 10 {
		_, _ = s.Write([]byte(`{"msg":"line","n":` + itoa(i) + `}` + "\n"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "10 lines at the host", func() bool { return len(h.got()) == 10 })
	if s.Dropped() != 0 || dials.Load() < 2 {
		t.Fatalf("dropped %d, dials %d", s.Dropped(), dials.Load())
	}
	for i, l := range h.got() {
		if !strings.Contains(l, `"n":`+itoa(i)+`}`) {
			t.Fatalf("line %d out of order: %q", i, l)
		}
	}
}
