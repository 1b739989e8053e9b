package audit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// The shipping protocol, over one stream connection the enclave dials
// (vsock to the parent, CID 3; host/auditlog listens):
//
//  1. The host writes one line: {"last_head":{"chain":HEX,"seq":N,"hash":HEX}}
//     naming the last head entry it stored (any chain), or {"last_head":null}.
//  2. The enclave writes entries, one JSON line each (auditfmt), of one
//     chain, in seq order, starting with the oldest it has not had
//     acknowledged.
//  3. The host writes {"chain":HEX,"ack":N} once every entry of the chain
//     up to seq N is in its file and fsynced. Acks are cumulative.
//
// After a lost connection the enclave dials again (backoff 50 ms doubling
// to 2 s) and sends again from the oldest unacknowledged entry; the host
// acknowledges entries it has already stored (same chain and seq) without
// writing them twice.

// Defaults of ShipConfig.
const (
	DefaultWriteTimeout = 5 * time.Second
	DefaultAckTimeout   = 10 * time.Second
	DefaultHelloTimeout = 5 * time.Second
	DefaultMaxBatch     = 256 << 10
	backoffMin          = 50 * time.Millisecond
	backoffMax          = 2 * time.Second
	maxHostLine         = 1024 // the host's lines: hello, acks
)

// ErrNoHost: Connect found no host that answered before its context ended.
var ErrNoHost = errors.New("audit: the host's audit receiver did not answer")

// ShipConfig tunes a Shipper.
type ShipConfig struct {
	// Dial connects to the host's audit receiver (in an enclave: vsock
	// CID 3, port 5052 by default: nitrosign-proxy --enclave-audit-port).
	// Required.
	Dial func(context.Context) (net.Conn, error)
	// WriteTimeout bounds one write to the host. Default 5s.
	WriteTimeout time.Duration
	// AckTimeout: entries sent and not acknowledged for this long (no ack
	// at all in that time) make the connection be dropped and dialled
	// again: a host that stalls, or a half-open connection. Default 10s.
	AckTimeout time.Duration
	// HelloTimeout bounds the wait for the host's first line after a
	// dial. Default 5s.
	HelloTimeout time.Duration
	// MaxBatch bounds the bytes of one write. Default 256 KiB.
	MaxBatch int
}

func (c ShipConfig) withDefaults() ShipConfig {
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	if c.AckTimeout <= 0 {
		c.AckTimeout = DefaultAckTimeout
	}
	if c.HelloTimeout <= 0 {
		c.HelloTimeout = DefaultHelloTimeout
	}
	if c.MaxBatch <= 0 {
		c.MaxBatch = DefaultMaxBatch
	}
	return c
}

// Shipper sends a Log's entries to the host and drops them from the
// backlog as the host acknowledges them. Use: NewShipper, Connect (the
// host's last head, for New), Ship(log), and at the end Log.Close then
// Shipper.Close.
type Shipper struct {
	cfg ShipConfig
	log *zap.Logger

	mu      sync.Mutex
	first   *hostConn // the connection Connect opened, for Ship
	audit   *Log
	closed  bool
	started bool

	connects atomic.Uint64 // connections that answered
	ctx      context.Context
	cancel   context.CancelFunc
	done     chan struct{}
}

// hostConn is a connection that answered, with its reader.
type hostConn struct {
	net.Conn
	br *bufio.Reader
}

// NewShipper returns a Shipper; it dials nothing yet.
func NewShipper(cfg ShipConfig, log *zap.Logger) (*Shipper, error) {
	if cfg.Dial == nil {
		return nil, errors.New("audit: shipper without Dial")
	}
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Shipper{cfg: cfg.withDefaults(), log: log.Named("audit"), ctx: ctx, cancel: cancel, done: make(chan struct{})}, nil
}

// Connect dials the host until one answers or ctx ends (the bounded wait
// of a start-up) and returns the head it says it stored last (nil: none).
// The connection is kept for Ship. When ctx ends first it returns an
// error wrapping ErrNoHost: start the chain with no previous head then
// (New(..., nil, ...)); its genesis says so with previous_head null, and
// entries wait in the backlog until the host answers.
func (s *Shipper) Connect(ctx context.Context) (*Head, error) {
	backoff := backoffMin
	var last error
	for {
		hc, head, err := s.dial(ctx)
		if err == nil {
			s.mu.Lock()
			if s.closed || s.started {
				s.mu.Unlock()
				_ = hc.Close()
				return nil, errors.New("audit: Connect after Ship or Close")
			}
			if s.first != nil {
				_ = s.first.Close()
			}
			s.first = hc
			s.mu.Unlock()
			return head, nil
		}
		last = err
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w: %w (last attempt: %v)", ErrNoHost, ctx.Err(), last)
		}
		backoff = min(2*backoff, backoffMax)
	}
}

// dial connects and reads the host's first line.
func (s *Shipper) dial(ctx context.Context) (*hostConn, *Head, error) {
	c, err := s.cfg.Dial(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("dial: %w", err)
	}
	hc := &hostConn{Conn: c, br: bufio.NewReaderSize(c, maxHostLine)}
	deadline := time.Now().Add(s.cfg.HelloTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	line, err := hc.br.ReadSlice('\n')
	stop()
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		_ = c.Close()
		return nil, nil, fmt.Errorf("the host's first line: %w", err)
	}
	head, err := parseHello(line)
	if err != nil {
		_ = c.Close()
		return nil, nil, err
	}
	s.connects.Add(1)
	return hc, head, nil
}

// parseHello reads {"last_head": {...} | null}.
func parseHello(line []byte) (*Head, error) {
	var h struct {
		LastHead *Head `json:"last_head"`
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(line, &raw); err != nil {
		return nil, fmt.Errorf("the host's first line is not a JSON object: %w", err)
	}
	if _, ok := raw["last_head"]; !ok {
		return nil, errors.New(`the host's first line has no "last_head"`)
	}
	if err := json.Unmarshal(line, &h); err != nil {
		return nil, fmt.Errorf("the host's last_head: %w", err)
	}
	if h.LastHead != nil {
		if err := h.LastHead.Validate(); err != nil {
			return nil, fmt.Errorf("the host's last_head: %w", err)
		}
	}
	return h.LastHead, nil
}

// Ship starts sending l's entries, on the connection Connect opened if it
// did, and on new ones for as long as the Shipper runs.
func (s *Shipper) Ship(l *Log) error {
	if l == nil {
		return errors.New("audit: Ship without a log")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("audit: Ship after Close")
	}
	if s.started {
		return errors.New("audit: Ship called twice")
	}
	s.started, s.audit = true, l
	first := s.first
	s.first = nil
	go s.run(l, first)
	return nil
}

// Connections is the number of connections to the host that answered.
func (s *Shipper) Connections() uint64 { return s.connects.Load() }

// Flush waits until the host has acknowledged every entry of the log, or
// ctx ends.
func (s *Shipper) Flush(ctx context.Context) error {
	s.mu.Lock()
	l := s.audit
	s.mu.Unlock()
	if l == nil {
		return nil
	}
	for {
		waiting, drained := l.waiting()
		if !waiting {
			return nil
		}
		select {
		case <-drained:
		case <-ctx.Done():
			st := l.Stats()
			return fmt.Errorf("audit: %d entries (%d bytes) not acknowledged by the host: %w", st.Backlog, st.BacklogBytes, ctx.Err())
		case <-s.done:
			return errors.New("audit: shipper stopped")
		}
	}
}

// Close waits for the host to acknowledge every entry until ctx ends (an
// error when some are left), then stops. Close the Log first, so that its
// last head goes too.
func (s *Shipper) Close(ctx context.Context) error {
	err := s.Flush(ctx)
	s.mu.Lock()
	s.closed = true
	started := s.started
	if s.first != nil {
		_ = s.first.Close()
		s.first = nil
	}
	s.mu.Unlock()
	s.cancel()
	if started {
		<-s.done
	}
	return err
}

// conn is one answered connection while run uses it.
type conn struct {
	hc     *hostConn
	sent   atomic.Uint64 // seq after the last entry written
	errs   chan error    // the reader's end (capacity 1)
	acked  chan struct{} // an ack arrived (capacity 1)
	closed chan struct{} // the reader returned
}

// run sends l's entries until the Shipper is closed.
func (s *Shipper) run(l *Log, first *hostConn) {
	defer close(s.done)
	var (
		c        *conn
		cursor   uint64 // next seq to send on c
		backoff  = backoffMin
		ackTimer = time.NewTimer(time.Hour)
		down     bool // the host was lost and not yet reached again
		pause    bool // a connection was dropped: back off before the next
	)
	ackTimer.Stop()
	defer ackTimer.Stop()
	open := func(hc *hostConn) {
		c = &conn{hc: hc, errs: make(chan error, 1), acked: make(chan struct{}, 1), closed: make(chan struct{})}
		cursor = l.firstUnacked()
		c.sent.Store(cursor)
		go s.read(l, c)
		if down {
			s.log.Info("audit host reached again", zap.Int("entries_waiting", l.Stats().Backlog))
			down = false
		}
	}
	drop := func(why error) {
		_ = c.hc.Close()
		<-c.closed
		c = nil
		ackTimer.Stop()
		pause = true
		if st := l.Stats(); st.Backlog > 0 && !down {
			s.log.Warn("audit host connection lost: entries wait until it is back", zap.Error(why),
				zap.Int("entries_waiting", st.Backlog), zap.Int("bytes_waiting", st.BacklogBytes))
			down = true
		}
	}
	defer func() {
		if c != nil {
			_ = c.hc.Close()
			<-c.closed
		}
	}()
	if first != nil {
		open(first)
	}
	for {
		if s.ctx.Err() != nil {
			return
		}
		if c == nil {
			if waiting, _ := l.waiting(); !waiting {
				select {
				case <-l.wake:
				case <-s.ctx.Done():
					return
				}
				continue
			}
			if pause {
				// A host that answers and then drops the connection (or
				// refuses an entry) is not dialled in a loop.
				if !s.sleep(backoff) {
					return
				}
				backoff = min(2*backoff, backoffMax)
				pause = false
			}
			hc, _, err := s.dial(s.ctx)
			if err != nil {
				if !down {
					s.log.Warn("audit host unreachable: entries wait until it answers", zap.Error(err))
					down = true
				}
				pause = true
				continue
			}
			open(hc)
		}
		lines, next := l.take(cursor, s.cfg.MaxBatch)
		if len(lines) > 0 {
			if cursor == l.firstUnacked() {
				// Nothing was outstanding: the wait for an ack starts now.
				ackTimer.Reset(s.cfg.AckTimeout)
			}
			// Sent before written: the host may answer before WriteTo
			// returns. A failed write drops the connection anyway.
			c.sent.Store(next)
			bufs := net.Buffers(lines)
			_ = c.hc.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
			if _, err := bufs.WriteTo(c.hc); err != nil {
				drop(fmt.Errorf("write: %w", err))
				continue
			}
			cursor = next
			continue
		}
		select {
		case <-l.wake:
		case <-c.acked:
			backoff = backoffMin // the host makes progress
			if cursor > l.firstUnacked() {
				ackTimer.Reset(s.cfg.AckTimeout)
			} else {
				ackTimer.Stop()
			}
		case err := <-c.errs:
			drop(err)
		case <-ackTimer.C:
			if cursor > l.firstUnacked() {
				drop(fmt.Errorf("no acknowledgement from the host for %v", s.cfg.AckTimeout))
			}
		case <-s.ctx.Done():
			return
		}
	}
}

// sleep waits d; false when the Shipper was closed meanwhile.
func (s *Shipper) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.ctx.Done():
		return false
	}
}

// read takes the host's acks on c until it ends.
func (s *Shipper) read(l *Log, c *conn) {
	defer close(c.closed)
	fail := func(err error) {
		c.errs <- err
	}
	for {
		line, err := c.hc.br.ReadSlice('\n')
		if err != nil {
			fail(fmt.Errorf("read: %w", err))
			return
		}
		var a struct {
			Chain string  `json:"chain"`
			Ack   *uint64 `json:"ack"`
		}
		if err := json.Unmarshal(bytes.TrimSpace(line), &a); err != nil || a.Ack == nil {
			fail(fmt.Errorf("the host sent %q, want an ack", clipLine(line)))
			return
		}
		if a.Chain != l.chain {
			fail(fmt.Errorf("the host acknowledged chain %q, this is %s", clipLine([]byte(a.Chain)), l.chain))
			return
		}
		if *a.Ack >= c.sent.Load() {
			fail(fmt.Errorf("the host acknowledged seq %d, not sent yet", *a.Ack))
			return
		}
		if err := l.ack(*a.Ack); err != nil {
			fail(err)
			return
		}
		select {
		case c.acked <- struct{}{}:
		default:
		}
	}
}

func clipLine(b []byte) string {
	if len(b) > 80 {
		b = b[:80]
	}
	return string(b)
}
