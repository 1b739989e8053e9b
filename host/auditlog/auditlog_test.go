package auditlog_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/audit"
	"github.com/nitrosign/nitrosign/host/auditlog"
	"github.com/nitrosign/nitrosign/host/auditverify"
	"github.com/nitrosign/nitrosign/host/verify"
	"github.com/nitrosign/nitrosign/internal/auditfmt"
	"github.com/nitrosign/nitrosign/internal/auditfmt/auditfmttest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var simulated = sync.OnceValues(func() (*attest.Simulated, error) { return attest.NewSimulated(zap.NewNop()) })

func sim(t *testing.T) *attest.Simulated {
	t.Helper()
	s, err := simulated()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func attestFunc(t *testing.T) func([]byte) ([]byte, error) {
	s := sim(t)
	return func(spki []byte) ([]byte, error) { return s.Attestation(nil, nil, spki) }
}

// verifyOptions trust the simulated NSM's root and expect its PCRs.
func verifyOptions(t *testing.T) auditverify.Options {
	t.Helper()
	root, err := x509.ParseCertificate(sim(t).DevRootDER())
	if err != nil {
		t.Fatal(err)
	}
	return auditverify.Options{Attestation: verify.Options{Root: root, PCRs: attest.SimulatedPCRs()}}
}

// receiver is a Receiver serving on TCP loopback.
type receiver struct {
	*auditlog.Receiver
	addr string
	path string
	logs *observer.ObservedLogs
	stop func()
}

func startReceiver(t *testing.T, cfg auditlog.Config) *receiver {
	t.Helper()
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "audit.jsonl")
	}
	core, logs := observer.New(zap.DebugLevel)
	r, err := auditlog.Open(cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- r.Serve(l) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = l.Close()
			if err := <-served; err != nil {
				t.Errorf("Serve: %v", err)
			}
			if err := r.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return &receiver{Receiver: r, addr: l.Addr().String(), path: cfg.Path, logs: logs, stop: stop}
}

func (r *receiver) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", r.addr)
}

// enclave runs the enclave's side for real: a Shipper that asks the host
// for its last head, a Log started with it, shipping.
type enclave struct {
	log  *audit.Log
	ship *audit.Shipper
}

func startEnclave(t *testing.T, dial func(context.Context) (net.Conn, error), cfg audit.Config, ship audit.ShipConfig) (*enclave, *audit.Head) {
	t.Helper()
	ship.Dial = dial
	s, err := audit.NewShipper(ship, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	prev, err := s.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l, err := audit.New(cfg, attestFunc(t), prev, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Ship(l); err != nil {
		t.Fatal(err)
	}
	e := &enclave{log: l, ship: s}
	t.Cleanup(func() { _ = e.stop() })
	return e, prev
}

// stop closes the log (its last head) and waits for the host to have
// everything.
func (e *enclave) stop() error {
	err := e.log.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return errors.Join(err, e.ship.Close(ctx))
}

func decide(t *testing.T, l *audit.Log, n int) {
	t.Helper()
	for i := range n {
		d := audit.Decision{
			Caller: "payments", CallerID: "c0ffee", Method: "/nitrosign.v1.SignerService/Sign", KeyID: "k1",
			Algorithm: "ECDSA_SHA_256", MessageSHA256: sha256.Sum256([]byte{byte(i), byte(i >> 8)}), Outcome: audit.Allowed, Code: codes.OK,
		}
		if i%10 == 9 {
			d.Outcome, d.Code, d.Reason = audit.Denied, codes.PermissionDenied, "caller may not use k1"
		}
		if err := l.Append(d); err != nil {
			t.Fatal(err)
		}
	}
}

// fileEntries parses every line of the file.
func fileEntries(t *testing.T, path string) []*auditfmt.Entry {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []*auditfmt.Entry
	for i, line := range bytes.SplitAfter(b, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		e, err := auditfmt.Parse(bytes.TrimSuffix(line, []byte("\n")))
		if err != nil {
			t.Fatalf("line %d: %v", i+1, err)
		}
		out = append(out, e)
	}
	return out
}

// The whole trail on loopback TCP: the real shipper and Log, the real
// receiver; then the proxy restarts (the receiver learns its last head
// from the file) and so does the enclave, whose new chain names that
// head; the verifier accepts the file: two chains, linked, every entry
// once, attested, signed.
func TestRoundTripAndRestart(t *testing.T) {
	r := startReceiver(t, auditlog.Config{})
	e1, prev := startEnclave(t, r.dial, audit.Config{HeadInterval: time.Hour}, audit.ShipConfig{})
	if prev != nil {
		t.Fatalf("a new file named a head: %+v", prev)
	}
	decide(t, e1.log, 600) // heads at 256 and 512, and at Close
	if err := e1.stop(); err != nil {
		t.Fatal(err)
	}
	n1 := e1.log.Stats().Next
	es := fileEntries(t, r.path)
	if uint64(len(es)) != n1 {
		t.Fatalf("%d entries in the file, the chain has %d", len(es), n1)
	}
	last := auditfmt.HeadOf(es[len(es)-1])
	if es[len(es)-1].Kind != auditfmt.KindHead || *r.LastHead() != last {
		t.Fatalf("last head %+v, file ends with %+v", r.LastHead(), es[len(es)-1])
	}
	if st := r.Stats(); st.Written != n1 || st.Refused != 0 {
		t.Fatalf("receiver stats %+v", st)
	}
	if fi, err := os.Stat(r.path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file mode %v, %v", fi.Mode(), err)
	}

	// The proxy restarts: the new receiver reads the last head back.
	r.stop()
	r2 := startReceiver(t, auditlog.Config{Path: r.path})
	if got := r2.LastHead(); got == nil || *got != last {
		t.Fatalf("after a restart the receiver's last head is %+v, want %+v", got, last)
	}
	// The enclave restarts: a new chain naming it.
	e2, prev := startEnclave(t, r2.dial, audit.Config{HeadInterval: time.Hour}, audit.ShipConfig{})
	if prev == nil || *prev != last {
		t.Fatalf("the host answered %+v, want %+v", prev, last)
	}
	decide(t, e2.log, 10)
	if err := e2.stop(); err != nil {
		t.Fatal(err)
	}

	rep, err := auditverify.VerifyFile(r.path, verifyOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK || rep.Errors != 0 || rep.Warnings != 0 || len(rep.Chains) != 2 {
		t.Fatalf("report: ok %v, %d errors, %d warnings, %d chains: %v", rep.OK, rep.Errors, rep.Warnings, len(rep.Chains), rep.Faults)
	}
	c1, c2 := rep.Chains[0], rep.Chains[1]
	if !c1.Attested || !c2.Attested || c1.Decisions != 600 || c1.Denied != 60 || c2.Decisions != 10 ||
		c2.PreviousHead == nil || *c2.PreviousHead != last || c1.Heads != 4 {
		t.Fatalf("chains %+v %+v", c1, c2)
	}
}

// relay sits between the shipper and the receiver. On its first
// connection it drops everything the receiver says after its first line
// (the acks) and cuts both sides once the receiver has stored what the
// enclave sent; later connections are relayed faithfully.
type relay struct {
	l     net.Listener
	conns atomic.Int32
	wg    sync.WaitGroup
}

func startRelay(t *testing.T, r *receiver, cutWhen func() bool) *relay {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rl := &relay{l: l}
	rl.wg.Add(1)
	go func() {
		defer rl.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			first := rl.conns.Add(1) == 1
			up, err := net.Dial("tcp", r.addr)
			if err != nil {
				_ = c.Close()
				continue
			}
			rl.wg.Add(2)
			go func() { // enclave -> host
				defer rl.wg.Done()
				_, _ = io.Copy(up, c)
				_ = up.Close()
			}()
			go func() { // host -> enclave
				defer rl.wg.Done()
				defer c.Close()
				if !first {
					_, _ = io.Copy(c, up)
					return
				}
				br := bufio.NewReader(up)
				hello, err := br.ReadBytes('\n')
				if err != nil {
					return
				}
				_, _ = c.Write(hello)
				go func() { _, _ = io.Copy(io.Discard, br) }() // acks lost
				deadline := time.Now().Add(10 * time.Second)
				for !cutWhen() && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
				_ = up.Close()
			}()
		}
	}()
	t.Cleanup(func() { _ = l.Close(); rl.wg.Wait() })
	return rl
}

func (rl *relay) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", rl.l.Addr().String())
}

// A connection lost mid-stream after the host stored entries but before
// the enclave heard its acks: the shipper dials again and sends them
// again; the receiver acknowledges them without writing them twice, and
// the file has each entry once.
func TestLostConnectionResendsOnce(t *testing.T) {
	r := startReceiver(t, auditlog.Config{})
	rl := startRelay(t, r, func() bool { return r.Stats().Written >= 52 })
	e, _ := startEnclave(t, rl.dial, audit.Config{HeadInterval: time.Hour}, audit.ShipConfig{AckTimeout: 10 * time.Second})
	decide(t, e.log, 50) // genesis, head, 50 decisions: 52 entries
	deadline := time.Now().Add(10 * time.Second)
	for rl.conns.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the shipper did not dial again")
		}
		time.Sleep(5 * time.Millisecond)
	}
	decide(t, e.log, 20)
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	st := r.Stats()
	if st.Duplicates < 52 || st.Refused != 0 {
		t.Fatalf("receiver stats %+v: want the first 52 entries acknowledged again, not written", st)
	}
	es := fileEntries(t, r.path)
	if n := e.log.Stats().Next; uint64(len(es)) != n || st.Written != n {
		t.Fatalf("%d lines in the file, %d written, the chain has %d entries", len(es), st.Written, n)
	}
	for i, x := range es {
		if x.Seq != uint64(i) {
			t.Fatalf("line %d is seq %d", i+1, x.Seq)
		}
	}
	rep, err := auditverify.VerifyFile(r.path, verifyOptions(t))
	if err != nil || !rep.OK || rep.Warnings != 0 {
		t.Fatalf("verify: %v %+v", err, rep)
	}
}

// The enclave starts while the host does not answer: its chain names no
// previous head, decisions wait in the bounded backlog until it is full,
// then Append fails closed with ErrBacklogFull (the signer refuses to
// sign); once the receiver is up, the backlog drains into the file and
// decisions are taken again. The file verifies.
func TestHostDownFailsClosed(t *testing.T) {
	var addr atomic.Pointer[string]
	dial := func(ctx context.Context) (net.Conn, error) {
		a := addr.Load()
		if a == nil {
			return nil, errors.New("connection refused")
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", *a)
	}
	s, err := audit.NewShipper(audit.ShipConfig{Dial: dial}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	prev, err := s.Connect(ctx)
	if !errors.Is(err, audit.ErrNoHost) || prev != nil {
		t.Fatalf("Connect: %v, %v", prev, err)
	}
	l, err := audit.New(audit.Config{MaxBacklog: 40, HeadInterval: time.Hour}, attestFunc(t), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	e := &enclave{log: l, ship: s}
	t.Cleanup(func() { _ = e.stop() })
	if err := s.Ship(l); err != nil {
		t.Fatal(err)
	}
	taken := 0
	for ; taken < 100; taken++ {
		err := l.Append(audit.Decision{MessageSHA256: sha256.Sum256([]byte{byte(taken)}), Outcome: audit.Allowed, Code: codes.OK})
		if errors.Is(err, audit.ErrBacklogFull) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if taken == 100 || taken == 0 {
		t.Fatalf("%d decisions taken without a host, want the backlog to fill", taken)
	}
	r := startReceiver(t, auditlog.Config{})
	addr.Store(&r.addr)
	deadline := time.Now().Add(10 * time.Second)
	for l.Stats().Backlog > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("backlog not drained: %+v", l.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	decide(t, l, 5)
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	rep, err := auditverify.VerifyFile(r.path, verifyOptions(t))
	if err != nil || !rep.OK || rep.Warnings != 0 || rep.Chains[0].Decisions != taken+5 || rep.Chains[0].PreviousHead != nil {
		t.Fatalf("verify: %v %+v %v", err, rep, rep.Faults)
	}
}

// rawConn is a hand-driven connection to the receiver, from local (an
// address on loopback), after the receiver's first line.
type rawConn struct {
	net.Conn
	br    *bufio.Reader
	hello string
}

func dialRaw(t *testing.T, r *receiver, local string) *rawConn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	c, err := d.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	hello, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("no first line: %v", err)
	}
	return &rawConn{Conn: c, br: br, hello: hello}
}

// send writes lines and returns the acks read until the receiver closes
// the connection (closed) or acknowledges seq until (-1: until it
// closes). Acks are cumulative: the receiver may acknowledge lines in
// several batches.
func (c *rawConn) send(t *testing.T, until int64, lines ...[]byte) (acks []uint64, closed bool) {
	t.Helper()
	for _, l := range lines {
		if _, err := c.Write(l); err != nil {
			break
		}
	}
	for until < 0 || len(acks) == 0 || acks[len(acks)-1] != uint64(until) {
		line, err := c.br.ReadBytes('\n')
		if err != nil {
			return acks, true
		}
		var a struct {
			Chain string `json:"chain"`
			Ack   uint64 `json:"ack"`
		}
		if err := json.Unmarshal(line, &a); err != nil {
			t.Fatalf("receiver sent %q", line)
		}
		acks = append(acks, a.Ack)
	}
	return acks, false
}

func newChain(t *testing.T, prev *auditfmt.Head) *auditfmttest.Chain {
	t.Helper()
	c, err := auditfmttest.New(attestFunc(t), prev)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// resealed is a copy of e with edit applied and its hash recomputed: well
// formed, but not what follows.
func resealed(e *auditfmt.Entry, edit func(*auditfmt.Entry)) []byte {
	x := *e
	edit(&x)
	x.Hash, _ = x.ComputeHash(nil)
	return append(x.AppendJSON(nil), '\n')
}

// Hostile or broken input is refused: logged at error, the connection
// closed, nothing of it written; the valid entries before it on the
// connection are stored and acknowledged.
func TestHostileInput(t *testing.T) {
	c := newChain(t, nil)
	msg := sha256.Sum256([]byte("m"))
	c.Decision("k1", msg)
	c.Head()
	c.Decision("k2", msg)
	lines := c.Lines() // genesis, decision, head, decision
	other := newChain(t, nil)
	spaced := bytes.Replace(lines[1], []byte(`"seq":1`), []byte(`"seq": 1`), 1)
	for _, tt := range []struct {
		name    string
		send    [][]byte
		stored  int // lines of the chain the file has after
		wantLog string
	}{
		{"garbage", [][]byte{[]byte("GET / HTTP/1.1\r\n")}, 0, "not an audit entry"},
		{"binary", [][]byte{{0xff, 0xfe, 0, 1, '\n'}}, 0, "not valid UTF-8"},
		{"an oversized line", [][]byte{lines[0], bytes.Repeat([]byte("a"), auditfmt.MaxLine+100), []byte("\n")}, 1, "a line longer than"},
		{"an edited entry", [][]byte{lines[0], bytes.Replace(lines[1], []byte(`"key_id":"k1"`), []byte(`"key_id":"k9"`), 1)}, 1, "hash does not match"},
		{"a reformatted entry", [][]byte{lines[0], spaced}, 1, "not in canonical form"},
		{"a wrong prev", [][]byte{lines[0], resealed(c.Entries[1], func(e *auditfmt.Entry) { e.Prev = strings.Repeat("1", 64) })}, 1, "is not the hash"},
		{"a seq skipped", [][]byte{lines[0], lines[2]}, 1, "seq 2 after seq 0"},
		{"a seq twice", [][]byte{lines[0], lines[1], lines[1]}, 2, "seq 1 after seq 1"},
		{"two chains on one connection", [][]byte{lines[0], other.Lines()[0]}, 1, "one chain a connection"},
		{"a chain starting mid-way with a gap", [][]byte{lines[0], lines[1], lines[3]}, 2, "seq 3 after seq 1"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := startReceiver(t, auditlog.Config{})
			rc := dialRaw(t, r, "")
			acks, closed := rc.send(t, -1, tt.send...)
			if !closed {
				t.Fatal("connection still open")
			}
			if len(acks) != 0 && acks[len(acks)-1] != uint64(tt.stored-1) {
				t.Fatalf("acks %v, want up to seq %d", acks, tt.stored-1)
			}
			b, _ := os.ReadFile(r.path)
			want := bytes.Join(lines[:tt.stored], nil)
			if !bytes.Equal(b, want) {
				t.Fatalf("file:\n%s\nwant:\n%s", b, want)
			}
			if st := r.Stats(); st.Refused != 1 || st.Written != uint64(tt.stored) {
				t.Fatalf("stats %+v", st)
			}
			found := false
			for _, e := range r.logs.FilterLevelExact(zap.ErrorLevel).All() {
				if strings.Contains(fmt.Sprint(e.ContextMap()["error"]), tt.wantLog) {
					found = true
				}
			}
			if !found {
				t.Fatalf("no error logged with %q: %v", tt.wantLog, r.logs.All())
			}
		})
	}
}

// Across connections the file's own state rules: an entry already stored
// is acknowledged and not written again; one that conflicts with it, or
// skips entries, or comes from another peer than the chain's, is refused.
func TestAcrossConnections(t *testing.T) {
	c := newChain(t, nil)
	msg := sha256.Sum256([]byte("m"))
	c.Decision("k1", msg)
	c.Head()
	lines := c.Lines()
	store := func(t *testing.T) *receiver {
		r := startReceiver(t, auditlog.Config{})
		rc := dialRaw(t, r, "")
		if acks, closed := rc.send(t, 2, lines...); closed {
			t.Fatalf("acks %v", acks)
		}
		_ = rc.Close()
		return r
	}
	t.Run("duplicates acknowledged, not written", func(t *testing.T) {
		r := store(t)
		before, _ := os.ReadFile(r.path)
		rc := dialRaw(t, r, "")
		if !strings.Contains(rc.hello, c.LastHead().Hash) {
			t.Fatalf("first line %q does not name the stored head", rc.hello)
		}
		acks, closed := rc.send(t, 2, lines...)
		if closed || acks[len(acks)-1] != 2 {
			t.Fatalf("acks %v closed %v", acks, closed)
		}
		after, _ := os.ReadFile(r.path)
		if !bytes.Equal(before, after) {
			t.Fatal("duplicates written")
		}
		// and the chain goes on after them on the same connection
		c2 := *c
		c2.Entries = append([]*auditfmt.Entry(nil), c.Entries...)
		c2.Decision("k3", msg)
		next := c2.Lines()[3]
		if acks, closed := rc.send(t, 3, next); closed {
			t.Fatalf("continuation: %v %v", acks, closed)
		}
		if st := r.Stats(); st.Duplicates != 3 || st.Written != 4 {
			t.Fatalf("stats %+v", st)
		}
	})
	for _, tt := range []struct {
		name  string
		local string
		line  []byte
		want  string
	}{
		{"another entry at a stored seq", "", resealed(c.Entries[2], func(e *auditfmt.Entry) { e.Time = auditfmt.FormatTime(time.Now().Add(time.Hour)) }),
			"the file holds another entry at this seq"},
		{"entries missing between", "", resealed(c.Entries[2], func(e *auditfmt.Entry) { e.Seq = 5; e.SignedSeq = 4 }), "seq 3 to 4 are missing"},
		{"the chain from another peer", "127.0.0.2", func() []byte {
			c2 := *c
			c2.Entries = append([]*auditfmt.Entry(nil), c.Entries...)
			c2.Decision("k4", msg)
			return c2.Lines()[3]
		}(), "the chain is 127.0.0.1's, this connection is 127.0.0.2's"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := store(t)
			before, _ := os.ReadFile(r.path)
			rc := dialRaw(t, r, tt.local)
			if acks, closed := rc.send(t, -1, tt.line); !closed || len(acks) != 0 {
				t.Fatalf("acks %v, closed %v; log %v", acks, closed, r.logs.All())
			}
			after, _ := os.ReadFile(r.path)
			if !bytes.Equal(before, after) {
				t.Fatal("refused entry written")
			}
			if r.logs.FilterMessageSnippet("refused").FilterFieldKey("error").Len() != 1 ||
				!strings.Contains(fmt.Sprint(r.logs.FilterMessageSnippet("refused").All()[0].ContextMap()["error"]), tt.want) {
				t.Fatalf("log: %v", r.logs.All())
			}
		})
	}
}

// At start the receiver reads the file's tail: its last head, where the
// chains stand (a chain goes on from there), and a partial last line,
// which the next write does not run into.
func TestTailOfExistingFile(t *testing.T) {
	c := newChain(t, nil)
	msg := sha256.Sum256([]byte("m"))
	for range 20 {
		c.Decision("k1", msg)
	}
	c.Head()
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	content := append(bytes.Join(c.Lines(), nil), []byte(`{"chain":"cut short by a cras`)...)
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	// A tail shorter than the file: the first line read is partial, and
	// skipped.
	r := startReceiver(t, auditlog.Config{Path: path, TailScan: 700})
	if got := r.LastHead(); got == nil || *got != *c.LastHead() {
		t.Fatalf("last head %+v, want %+v", got, c.LastHead())
	}
	c.Decision("k1", msg)
	c.Head()
	lines := c.Lines()
	rc := dialRaw(t, r, "")
	if acks, closed := rc.send(t, int64(len(lines)-1), lines[len(lines)-2:]...); closed {
		t.Fatalf("acks %v closed %v", acks, closed)
	}
	b, _ := os.ReadFile(path)
	if !bytes.HasSuffix(b, append([]byte(`cras`+"\n"), bytes.Join(lines[len(lines)-2:], nil)...)) {
		t.Fatalf("the new entries do not start on a line of their own:\n%s", b[len(b)-600:])
	}
	rep, err := auditverify.VerifyFile(path, verifyOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	if rep.Errors != 1 || rep.Faults[0].Kind != auditverify.FaultSyntax || rep.Faults[0].Line != 23 {
		t.Fatalf("want only the partial line 23 reported: %v", rep.Faults)
	}
}

// A write that fails stops storing: nothing is acknowledged, and nothing
// more is taken until a restart.
func TestWriteFailureStops(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full on this machine")
	}
	r := startReceiver(t, auditlog.Config{Path: "/dev/full"})
	lines := newChain(t, nil).Lines()
	for i := range 2 {
		rc := dialRaw(t, r, "")
		if acks, closed := rc.send(t, -1, lines[0]); !closed || len(acks) != 0 {
			t.Fatalf("connection %d: acks %v", i, acks)
		}
	}
	if r.logs.FilterMessageSnippet("audit file write failed").Len() != 1 || r.logs.FilterMessageSnippet("audit entries refused").Len() != 2 {
		t.Fatalf("log: %v", r.logs.All())
	}
}

func TestOpenFailures(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		name, path, want string
	}{
		{"relative", "audit.jsonl", "want an absolute path"},
		{"not clean", dir + "/../x/audit.jsonl", "want a clean path"},
		{"no directory", filepath.Join(dir, "missing", "audit.jsonl"), "audit file directory"},
		{"a directory", dir, "audit file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r, err := auditlog.Open(auditlog.Config{Path: tt.path}, zap.NewNop())
			if err == nil {
				_ = r.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("%v, want %q", err, tt.want)
			}
		})
	}
}

// With LogDecisions every stored decision is logged at info, fields only,
// and heads too.
func TestLogDecisions(t *testing.T) {
	r := startReceiver(t, auditlog.Config{LogDecisions: true})
	c := newChain(t, nil)
	secret := []byte("the message itself, never logged")
	c.Decision("k1", sha256.Sum256(secret))
	c.Head()
	rc := dialRaw(t, r, "")
	if acks, closed := rc.send(t, 2, c.Lines()...); closed {
		t.Fatalf("no ack: %v", acks)
	}
	d := r.logs.FilterMessage("audit decision").All()
	if len(d) != 1 || d[0].Level != zap.InfoLevel {
		t.Fatalf("decisions logged: %v", d)
	}
	m := d[0].ContextMap()
	if m["key_id"] != "k1" || m["outcome"] != "allowed" || m["code"] != "OK" || m["message_sha256"] != c.Entries[1].MessageSHA256 || m["seq"] != uint64(1) {
		t.Fatalf("fields %v", m)
	}
	if r.logs.FilterMessage("audit head").Len() != 1 || r.logs.FilterMessage("audit chain started").Len() != 1 {
		t.Fatalf("log %v", r.logs.All())
	}
	for _, e := range r.logs.All() {
		if strings.Contains(fmt.Sprint(e.ContextMap()), string(secret)) {
			t.Fatal("message bytes logged")
		}
	}
}

// Connections beyond MaxConns, or beyond MaxPeerConns from one peer, are
// closed at once; a silent one is closed after IdleTimeout.
func TestConnectionBounds(t *testing.T) {
	refused := func(t *testing.T, r *receiver, local string) {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
		c, err := d.Dial("tcp", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 64)); err == nil {
			t.Fatalf("a connection from %s got %d bytes, want it closed", local, n)
		}
	}
	t.Run("all peers", func(t *testing.T) {
		r := startReceiver(t, auditlog.Config{MaxConns: 1, IdleTimeout: 300 * time.Millisecond})
		first := dialRaw(t, r, "")
		refused(t, r, "127.0.0.2")
		start := time.Now()
		if _, err := first.br.ReadByte(); err == nil || time.Since(start) > 4*time.Second {
			t.Fatalf("idle connection not closed: %v after %v", err, time.Since(start))
		}
	})
	t.Run("one peer", func(t *testing.T) {
		r := startReceiver(t, auditlog.Config{MaxPeerConns: 2})
		dialRaw(t, r, "127.0.0.1")
		dialRaw(t, r, "127.0.0.1")
		refused(t, r, "127.0.0.1")
		// Another peer still gets in.
		if got := dialRaw(t, r, "127.0.0.2").hello; got != `{"last_head":null}`+"\n" {
			t.Fatalf("first line %q", got)
		}
		if r.logs.FilterMessageSnippet("this peer has too many open").Len() != 1 {
			t.Fatalf("log %v", r.logs.All())
		}
	})
}

func TestModule(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	var addr string
	core, logs := observer.New(zap.DebugLevel)
	app := fxtest.New(t,
		fx.Supply(auditlog.Config{Port: 5052, Path: path}),
		fx.Supply(zap.New(core)),
		fx.Supply(auditlog.ListenFunc(func() (net.Listener, error) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err == nil {
				addr = l.Addr().String()
			}
			return l, err
		})),
		auditlog.Module,
	)
	app.RequireStart()
	r := &receiver{addr: addr}
	if got := dialRaw(t, r, "").hello; got != `{"last_head":null}`+"\n" {
		t.Fatalf("first line %q", got)
	}
	app.RequireStop()
	if logs.FilterMessage("receiving enclaves' audit trails").Len() != 1 {
		t.Fatalf("log %v", logs.All())
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
}

// Port 0: nothing listens, no file is made.
func TestModuleOff(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	app := fxtest.New(t,
		fx.Supply(auditlog.Config{Port: 0, Path: path}),
		fx.Supply(zap.NewNop()),
		fx.Supply(auditlog.ListenFunc(func() (net.Listener, error) { t.Error("listened with port 0"); return nil, nil })),
		auditlog.Module,
	)
	app.RequireStart().RequireStop()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("file made: %v", err)
	}
}

func TestModuleStartFailure(t *testing.T) {
	app := fx.New(
		fx.Supply(auditlog.Config{Port: 5052, Path: filepath.Join(t.TempDir(), "missing", "audit.jsonl")}),
		fx.Supply(zap.NewNop()),
		fx.NopLogger,
		auditlog.Module,
	)
	err := app.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "StateDirectory=nitrosign") {
		t.Fatalf("Start: %v", err)
	}
}
