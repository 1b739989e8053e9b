package audit

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/host/verify"
	"github.com/nitrosign/nitrosign/internal/auditfmt"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// simulated is the development NSM every test attests with; its root is
// the one to trust.
var simulated = sync.OnceValues(func() (*attest.Simulated, error) { return attest.NewSimulated(zap.NewNop()) })

func attestFunc(t testing.TB) AttestFunc {
	t.Helper()
	sim, err := simulated()
	if err != nil {
		t.Fatal(err)
	}
	return func(spki []byte) ([]byte, error) { return sim.Attestation(nil, nil, spki) }
}

func newLog(t testing.TB, cfg Config, previous *Head) *Log {
	t.Helper()
	l, err := New(cfg, attestFunc(t), previous, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func decision(i int) Decision {
	return Decision{
		Caller: "payments", CallerID: "c0ffee", Method: "/nitrosign.v1.SignerService/Sign", KeyID: "k" + strings.Repeat("1", i%3),
		Algorithm: "ECDSA_SHA_256", MessageSHA256: sha256.Sum256([]byte{byte(i)}), Outcome: Allowed, Code: codes.OK,
	}
}

// entries parses every line waiting in l's backlog.
func entries(t *testing.T, l *Log) []*auditfmt.Entry {
	t.Helper()
	lines, _ := l.take(0, 1<<30)
	var out []*auditfmt.Entry
	for _, line := range lines {
		if !bytes.HasSuffix(line, []byte("\n")) || bytes.Count(line, []byte("\n")) != 1 {
			t.Fatalf("not one line: %q", line)
		}
		e, err := auditfmt.Parse(line[:len(line)-1])
		if err != nil {
			t.Fatalf("%v: %s", err, line)
		}
		out = append(out, e)
	}
	return out
}

// A chain as the package documentation says: the genesis with its
// attested key, a head at once, decisions linked by prev, a head every
// HeadEvery decisions and at Close, each signed by the audit key.
func TestChain(t *testing.T) {
	prev := &Head{Chain: strings.Repeat("ab", 16), Seq: 41, Hash: strings.Repeat("cd", 32)}
	l := newLog(t, Config{HeadEvery: 3, HeadInterval: time.Hour}, prev)
	for i := range 7 {
		if err := l.Append(decision(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	es := entries(t, l)
	var kinds []string
	for i, e := range es {
		kinds = append(kinds, string(e.Kind))
		if e.Chain != l.Chain() || e.Seq != uint64(i) {
			t.Fatalf("entry %d: chain %s seq %d", i, e.Chain, e.Seq)
		}
		if i > 0 && e.Prev != es[i-1].Hash {
			t.Fatalf("entry %d: prev is not the hash of %d", i, i-1)
		}
	}
	want := "genesis head decision decision decision head decision decision decision head decision head"
	if got := strings.Join(kinds, " "); got != want {
		t.Fatalf("kinds %s\nwant  %s", got, want)
	}
	g := es[0]
	if !reflect.DeepEqual(g.PreviousHead, prev) {
		t.Fatalf("previous_head %+v, want %+v", g.PreviousHead, prev)
	}
	sim, _ := simulated()
	root, err := x509Root(sim.DevRootDER())
	if err != nil {
		t.Fatal(err)
	}
	doc, err := verify.Verify(g.Attestation, verify.Options{Root: root, PCRs: attest.SimulatedPCRs()})
	if err != nil {
		t.Fatalf("genesis document: %v", err)
	}
	if !bytes.Equal(doc.PublicKey, g.AuditKey) {
		t.Fatal("the document does not attest the audit key")
	}
	key, err := auditfmt.AuditKey(g.AuditKey)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.Kind == auditfmt.KindHead && !auditfmt.VerifyHead(key, e) {
			t.Fatalf("head %d does not verify", e.Seq)
		}
	}
	st := l.Stats()
	if st.Decisions != 7 || st.Heads != 4 || st.Backlog != len(es) || st.Next != uint64(len(es)) {
		t.Fatalf("stats %+v", st)
	}
	if err := l.Append(decision(0)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// A head comes HeadInterval after a decision, and none while nothing
// happens.
func TestHeadInterval(t *testing.T) {
	l := newLog(t, Config{HeadInterval: 20 * time.Millisecond}, nil)
	time.Sleep(100 * time.Millisecond)
	if st := l.Stats(); st.Heads != 1 {
		t.Fatalf("%d heads while idle, want the first one only", st.Heads)
	}
	if err := l.Append(decision(1)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for l.Stats().Heads < 2 {
		if time.Now().After(deadline) {
			t.Fatal("no head after a decision")
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if st := l.Stats(); st.Heads != 2 {
		t.Fatalf("%d heads, want 2: a head only when a decision came since the last", st.Heads)
	}
}

// Without acknowledgements the backlog fills: Append then fails closed
// with ErrBacklogFull and records nothing; room for a head is always
// kept; acknowledgements make room again. Both bounds, entries and bytes.
func TestBacklogFull(t *testing.T) {
	t.Run("entries", func(t *testing.T) {
		l := newLog(t, Config{MaxBacklog: 10, HeadEvery: 1000, HeadInterval: time.Hour}, nil)
		n := 0
		for ; n < 100; n++ {
			if err := l.Append(decision(n)); err != nil {
				if !errors.Is(err, ErrBacklogFull) {
					t.Fatalf("Append %d: %v", n, err)
				}
				break
			}
		}
		// genesis + head + 7 decisions, one slot kept for a head.
		if n != 7 {
			t.Fatalf("%d decisions taken, want 7", n)
		}
		st := l.Stats()
		if st.Refused != 1 || st.Decisions != 7 || st.Backlog != 9 {
			t.Fatalf("stats %+v", st)
		}
		if err := l.Close(); err != nil {
			t.Fatalf("Close could not sign what was recorded: %v", err)
		}
		if es := entries(t, l); len(es) != 10 || es[9].Kind != auditfmt.KindHead {
			t.Fatalf("%d entries, last %s", len(es), es[len(es)-1].Kind)
		}
	})
	t.Run("acknowledged entries make room", func(t *testing.T) {
		l := newLog(t, Config{MaxBacklog: 10, HeadEvery: 1000, HeadInterval: time.Hour}, nil)
		for i := range 7 {
			if err := l.Append(decision(i)); err != nil {
				t.Fatal(err)
			}
		}
		if err := l.Append(decision(7)); !errors.Is(err, ErrBacklogFull) {
			t.Fatalf("full: %v", err)
		}
		if err := l.ack(4); err != nil {
			t.Fatal(err)
		}
		for i := range 5 {
			if err := l.Append(decision(i)); err != nil {
				t.Fatalf("after the ack, %d: %v", i, err)
			}
		}
		if err := l.ack(1000); err == nil {
			t.Fatal("an ack of an entry never appended was taken")
		}
	})
	t.Run("bytes", func(t *testing.T) {
		min := auditfmt.MaxLine + 3*headReserve
		l := newLog(t, Config{MaxBacklogBytes: min, HeadEvery: 1000, HeadInterval: time.Hour}, nil)
		before := l.Stats().BacklogBytes
		big := decision(0)
		big.Reason = strings.Repeat("r", auditfmt.MaxText)
		n := 0
		for ; n < 10000; n++ {
			if err := l.Append(big); err != nil {
				if !errors.Is(err, ErrBacklogFull) {
					t.Fatal(err)
				}
				break
			}
		}
		st := l.Stats()
		if n == 10000 || st.BacklogBytes+headReserve > min || st.BacklogBytes < before {
			t.Fatalf("%d decisions, %d bytes waiting, limit %d", n, st.BacklogBytes, min)
		}
		if err := l.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	})
}

// A head line always fits the room kept for it, even at the largest seq.
func TestHeadLineFitsReserve(t *testing.T) {
	h := auditfmt.Entry{Chain: strings.Repeat("f", 32), Seq: 1<<64 - 1, Time: auditfmt.FormatTime(time.Now()), Kind: auditfmt.KindHead,
		Prev: strings.Repeat("f", 64), SignedSeq: 1<<64 - 2, SignedHash: strings.Repeat("f", 64), Signature: make([]byte, 64)}
	line, _ := h.Seal(nil, nil)
	if len(line) > headReserve {
		t.Fatalf("a head line is %d bytes, reserve %d", len(line), headReserve)
	}
}

// The API takes the message's hash, never the message: no field of
// Decision can carry message bytes, and the entry holds the hash in hex.
func TestNoMessageBytes(t *testing.T) {
	ty := reflect.TypeFor[Decision]()
	for i := range ty.NumField() {
		f := ty.Field(i)
		if f.Type.Kind() == reflect.Slice || f.Type.Kind() == reflect.Interface || f.Type.Kind() == reflect.Pointer {
			t.Errorf("Decision.%s is a %s: it could carry a message", f.Name, f.Type)
		}
		if f.Type.Kind() == reflect.Array && f.Name != "MessageSHA256" {
			t.Errorf("Decision.%s is an array", f.Name)
		}
	}
	message := []byte("TOP-SECRET-MESSAGE-BYTES-0123456789")
	l := newLog(t, Config{}, nil)
	d := decision(0)
	d.MessageSHA256 = sha256.Sum256(message)
	if err := l.Append(d); err != nil {
		t.Fatal(err)
	}
	_ = l.Close()
	lines, _ := l.take(0, 1<<30)
	all := bytes.Join(lines, nil)
	if bytes.Contains(all, message) || bytes.Contains(all, []byte(hex.EncodeToString(message))) {
		t.Fatal("message bytes in the log")
	}
	if !bytes.Contains(all, []byte(`"message_sha256":"`+hex.EncodeToString(d.MessageSHA256[:])+`"`)) {
		t.Fatal("the message's hash is not in the log")
	}
}

// Text is cut to MaxText bytes on a rune boundary and made valid UTF-8,
// so that a decision is always recorded.
func TestTextMadeValid(t *testing.T) {
	l := newLog(t, Config{}, nil)
	d := decision(0)
	d.Caller = strings.Repeat("é", auditfmt.MaxText) // 2 bytes each
	d.Reason = "bad \xff byte"
	if err := l.Append(d); err != nil {
		t.Fatal(err)
	}
	es := entries(t, l)
	e := es[len(es)-1]
	if len(e.Caller) != auditfmt.MaxText || e.Caller != strings.Repeat("é", auditfmt.MaxText/2) || e.Reason != "bad \uFFFD byte" {
		t.Fatalf("caller %d bytes, reason %q", len(e.Caller), e.Reason)
	}
}

// Decisions that contradict themselves are refused, with nothing
// recorded.
func TestInvalidDecision(t *testing.T) {
	l := newLog(t, Config{}, nil)
	for _, d := range []Decision{
		{Outcome: "maybe", Code: codes.OK},
		{Outcome: Allowed, Code: codes.PermissionDenied},
		{Outcome: Denied, Code: codes.OK},
		{Outcome: Denied, Code: codes.Code(99)},
		{},
	} {
		if err := l.Append(d); !errors.Is(err, ErrDecision) {
			t.Errorf("%+v: %v", d, err)
		}
	}
	if st := l.Stats(); st.Next != 2 {
		t.Fatalf("entries recorded: %+v", st)
	}
	d := decision(0)
	d.Outcome, d.Code, d.Reason = Denied, codes.PermissionDenied, "not allowed"
	if err := l.Append(d); err != nil {
		t.Fatal(err)
	}
	es := entries(t, l)
	if e := es[len(es)-1]; e.Outcome != "denied" || e.Code != "PermissionDenied" || e.Reason != "not allowed" {
		t.Fatalf("%+v", e)
	}
}

func TestNewFailures(t *testing.T) {
	for _, tt := range []struct {
		name   string
		cfg    Config
		attest AttestFunc
		prev   *Head
		want   string
	}{
		{"no attestation", Config{}, nil, nil, "no attestation function"},
		{"attestation fails", Config{}, func([]byte) ([]byte, error) { return nil, errors.New("nsm gone") }, nil, "attestation of the audit key: nsm gone"},
		{"empty document", Config{}, func([]byte) ([]byte, error) { return nil, nil }, nil, "attestation document of 0 bytes"},
		{"huge document", Config{}, func([]byte) ([]byte, error) { return make([]byte, 17<<10), nil }, nil, "attestation document of 17408 bytes"},
		{"bad previous head", Config{}, attestFunc(t), &Head{Chain: "x", Seq: 1, Hash: "y"}, "previous head"},
		{"previous head seq 0", Config{}, attestFunc(t), &Head{Chain: strings.Repeat("a", 32), Seq: 0, Hash: strings.Repeat("b", 64)}, "previous head"},
		{"tiny backlog", Config{MaxBacklog: 3}, attestFunc(t), nil, "want at least 4"},
		{"tiny byte backlog", Config{MaxBacklogBytes: 1000}, attestFunc(t), nil, "want at least"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			l, err := New(tt.cfg, tt.attest, tt.prev, nil)
			if err == nil {
				_ = l.Close()
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("%v, want %q", err, tt.want)
			}
		})
	}
}

// Append from many goroutines: one chain, no entry lost, links intact.
func TestConcurrentAppend(t *testing.T) {
	l := newLog(t, Config{HeadEvery: 16, HeadInterval: time.Millisecond}, nil)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				if err := l.Append(decision(g*1000 + i)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	_ = l.Close()
	es := entries(t, l)
	decisions := 0
	for i, e := range es {
		if e.Seq != uint64(i) || (i > 0 && e.Prev != es[i-1].Hash) {
			t.Fatalf("entry %d broken", i)
		}
		if e.Kind == auditfmt.KindDecision {
			decisions++
		}
	}
	if decisions != 1600 {
		t.Fatalf("%d decisions, want 1600", decisions)
	}
}

// BenchmarkAppend is the cost Append adds to a signing call: one entry
// (canonical encoding, SHA-256, JSON line) under the log's lock, and a
// head (an Ed25519 signature) every 256 decisions. The backlog is
// acknowledged as it goes, as the host would.
func BenchmarkAppend(b *testing.B) {
	l, err := New(Config{}, attestFunc(b), nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	d := decision(1)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if err := l.Append(d); err != nil {
			b.Fatal(err)
		}
		if i%1024 == 1023 {
			_ = l.ack(l.Stats().Next - 1)
		}
	}
}

// BenchmarkAppendParallel: Append from every CPU at once (the lock is
// the chain's order).
func BenchmarkAppendParallel(b *testing.B) {
	l, err := New(Config{MaxBacklog: 1 << 22, MaxBacklogBytes: 1 << 31}, attestFunc(b), nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	var mu sync.Mutex
	n := 0
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		d := decision(2)
		for pb.Next() {
			if err := l.Append(d); err != nil {
				b.Error(err)
				return
			}
			mu.Lock()
			n++
			if n%4096 == 0 {
				_ = l.ack(l.Stats().Next - 1)
			}
			mu.Unlock()
		}
	})
}

func x509Root(der []byte) (*x509.Certificate, error) { return x509.ParseCertificate(der) }
