package audit

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/internal/auditfmt"
)

// fakeHost is a scripted audit receiver: serve runs for each connection,
// with its index (0, 1, ...).
type fakeHost struct {
	l     net.Listener
	conns atomic.Int32
	wg    sync.WaitGroup
}

func startFakeHost(t *testing.T, serve func(i int, c net.Conn, br *bufio.Reader)) *fakeHost {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &fakeHost{l: l}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			i := int(h.conns.Add(1)) - 1
			h.wg.Add(1)
			go func() {
				defer h.wg.Done()
				defer c.Close()
				serve(i, c, bufio.NewReader(c))
			}()
		}
	}()
	t.Cleanup(func() { _ = l.Close(); h.wg.Wait() })
	return h
}

func (h *fakeHost) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", h.l.Addr().String())
}

// readEntries reads n entries from br.
func readEntries(t *testing.T, br *bufio.Reader, n int) []*auditfmt.Entry {
	var out []*auditfmt.Entry
	for range n {
		line, err := br.ReadBytes('\n')
		if err != nil {
			t.Errorf("read: %v", err)
			return out
		}
		e, err := auditfmt.Parse(line[:len(line)-1])
		if err != nil {
			t.Errorf("parse: %v", err)
			return out
		}
		out = append(out, e)
	}
	return out
}

func ack(c net.Conn, e *auditfmt.Entry) error {
	_, err := fmt.Fprintf(c, `{"chain":%q,"ack":%d}`+"\n", e.Chain, e.Seq)
	return err
}

func newShipper(t *testing.T, cfg ShipConfig) *Shipper {
	t.Helper()
	s, err := NewShipper(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.Close(ctx)
	})
	return s
}

func TestConnectHello(t *testing.T) {
	head := Head{Chain: strings.Repeat("ab", 16), Seq: 9, Hash: strings.Repeat("cd", 32)}
	for _, tt := range []struct {
		name, hello string
		want        *Head
	}{
		{"no head", `{"last_head":null}`, nil},
		{"a head", fmt.Sprintf(`{"last_head":{"chain":%q,"seq":9,"hash":%q}}`, head.Chain, head.Hash), &head},
		{"unknown members are ignored", `{"last_head":null,"version":2}`, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := startFakeHost(t, func(_ int, c net.Conn, br *bufio.Reader) {
				_, _ = c.Write([]byte(tt.hello + "\n"))
				_, _ = br.ReadByte() // until the shipper closes
			})
			s := newShipper(t, ShipConfig{Dial: h.dial})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			got, err := s.Connect(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if (got == nil) != (tt.want == nil) || (got != nil && *got != *tt.want) {
				t.Fatalf("Connect = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// A host that does not answer, or answers nonsense, is tried again until
// the context ends: then ErrNoHost, and the chain starts without a
// previous head.
func TestConnectNoHost(t *testing.T) {
	for _, tt := range []struct {
		name  string
		hello string // "" = says nothing
	}{
		{"silent", ""},
		{"not JSON", "hello\n"},
		{"no last_head", `{"head":null}` + "\n"},
		{"a bad head", `{"last_head":{"chain":"x","seq":1,"hash":"y"}}` + "\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := startFakeHost(t, func(_ int, c net.Conn, br *bufio.Reader) {
				_, _ = c.Write([]byte(tt.hello))
				_, _ = br.ReadByte()
			})
			s := newShipper(t, ShipConfig{Dial: h.dial, HelloTimeout: 50 * time.Millisecond})
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			if _, err := s.Connect(ctx); !errors.Is(err, ErrNoHost) {
				t.Fatalf("Connect: %v", err)
			}
			if h.conns.Load() < 2 {
				t.Fatalf("%d attempts, want retries", h.conns.Load())
			}
		})
	}
	t.Run("nothing listens", func(t *testing.T) {
		s := newShipper(t, ShipConfig{Dial: func(context.Context) (net.Conn, error) { return nil, errors.New("connection refused") }})
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		_, err := s.Connect(ctx)
		if !errors.Is(err, ErrNoHost) || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("Connect: %v", err)
		}
	})
}

// A connection lost after the host stored some entries: the shipper
// dials again and sends from the oldest unacknowledged entry, and the
// backlog drains.
func TestShipResendsFromFirstUnacked(t *testing.T) {
	var (
		mu     sync.Mutex
		firsts []uint64 // the first seq received on each connection
	)
	h := startFakeHost(t, func(i int, c net.Conn, br *bufio.Reader) {
		_, _ = c.Write([]byte(`{"last_head":null}` + "\n"))
		es := readEntries(t, br, 1)
		if len(es) == 0 {
			return
		}
		mu.Lock()
		firsts = append(firsts, es[0].Seq)
		mu.Unlock()
		if i == 0 {
			// Store two more, acknowledge up to them, then go away.
			es = append(es, readEntries(t, br, 2)...)
			_ = ack(c, es[len(es)-1])
			time.Sleep(50 * time.Millisecond)
			return
		}
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			e, err := auditfmt.Parse(line[:len(line)-1])
			if err != nil {
				t.Error(err)
				return
			}
			_ = ack(c, e)
		}
	})
	s := newShipper(t, ShipConfig{Dial: h.dial})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	prev, err := s.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l := newLog(t, Config{HeadInterval: time.Hour}, prev)
	for i := range 5 {
		if err := l.Append(decision(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Ship(l); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(firsts) != 2 || firsts[0] != 0 || firsts[1] != 3 {
		t.Fatalf("first seq on each connection: %v, want [0 3]", firsts)
	}
	if st := l.Stats(); st.Backlog != 0 || st.BacklogBytes != 0 {
		t.Fatalf("backlog not drained: %+v", st)
	}
}

// A host that takes the entries but never acknowledges them (stalled,
// half-open) is dropped after AckTimeout and dialled again; so is one
// that acknowledges what was never sent.
func TestShipDropsBadHosts(t *testing.T) {
	for _, tt := range []struct {
		name  string
		reply func(c net.Conn, e *auditfmt.Entry)
	}{
		{"no ack", func(net.Conn, *auditfmt.Entry) {}},
		{"ack of an unsent entry", func(c net.Conn, e *auditfmt.Entry) {
			_, _ = fmt.Fprintf(c, `{"chain":%q,"ack":%d}`+"\n", e.Chain, e.Seq+100)
		}},
		{"ack of another chain", func(c net.Conn, e *auditfmt.Entry) {
			_, _ = fmt.Fprintf(c, `{"chain":%q,"ack":%d}`+"\n", strings.Repeat("0", 32), e.Seq)
		}},
		{"garbage", func(c net.Conn, _ *auditfmt.Entry) { _, _ = c.Write([]byte("ok\n")) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := startFakeHost(t, func(_ int, c net.Conn, br *bufio.Reader) {
				_, _ = c.Write([]byte(`{"last_head":null}` + "\n"))
				for {
					line, err := br.ReadBytes('\n')
					if err != nil {
						return
					}
					if e, err := auditfmt.Parse(line[:len(line)-1]); err == nil {
						tt.reply(c, e)
					}
				}
			})
			s := newShipper(t, ShipConfig{Dial: h.dial, AckTimeout: 100 * time.Millisecond})
			l := newLog(t, Config{HeadInterval: time.Hour}, nil)
			if err := s.Ship(l); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for h.conns.Load() < 3 {
				if time.Now().After(deadline) {
					t.Fatalf("%d connections: the bad host was not dropped and dialled again", h.conns.Load())
				}
				time.Sleep(10 * time.Millisecond)
			}
			if st := l.Stats(); st.Backlog != 2 {
				t.Fatalf("backlog %+v: nothing may be dropped without a valid ack", st)
			}
		})
	}
}

// Without a host, Close gives up when its context ends and says what was
// not delivered.
func TestCloseWithoutHost(t *testing.T) {
	s := newShipper(t, ShipConfig{Dial: func(context.Context) (net.Conn, error) { return nil, errors.New("no route") }})
	l := newLog(t, Config{}, nil)
	if err := s.Ship(l); err != nil {
		t.Fatal(err)
	}
	if err := s.Ship(l); err == nil {
		t.Fatal("Ship twice")
	}
	_ = l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := s.Close(ctx)
	if err == nil || !strings.Contains(err.Error(), "2 entries") || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close: %v", err)
	}
}
