// Package logship sends the enclave's log lines to the parent instance over
// vsock, where the host proxy writes them to its own log (and so to
// journald): a production enclave has no readable console (nitro-cli's
// console works only in debug mode, whose PCRs are all zero).
//
// A Shipper is a zapcore.WriteSyncer that never blocks its caller: a line
// is copied into a bounded queue and sent by one goroutine over a
// connection it dials, and redials with backoff, to the parent. While the
// host does not read (no receiver yet, a receiver that stalls), the queue
// fills and further lines are dropped and counted; the next line that gets
// through says how many were lost. Signing never waits for a log line.
//
// The wire format is what zap's JSON encoder writes: one JSON object per
// line, each ending in '\n' (docs/DEPLOY.md, "Enclave logs").
package logship

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Defaults of Config.
const (
	DefaultMaxBuffer    = 1 << 20
	DefaultWriteTimeout = 5 * time.Second
	backoffMin          = 50 * time.Millisecond
	backoffMax          = 2 * time.Second
)

// Config tunes a Shipper.
type Config struct {
	// Dial connects to the host's receiver (in an enclave: vsock CID 3,
	// the parent). Required.
	Dial func(context.Context) (net.Conn, error)
	// MaxBuffer bounds, in bytes, the lines queued while the host does
	// not read; beyond it lines are dropped and counted. Default 1 MiB.
	MaxBuffer int
	// WriteTimeout bounds one write to the host; a host that takes no
	// bytes for this long is disconnected and redialled. Default 5s.
	WriteTimeout time.Duration
}

// Shipper queues log lines and sends them to the host. Its zero value is
// not usable: build it with New and end it with Close.
type Shipper struct {
	cfg Config

	mu      sync.Mutex
	queue   [][]byte
	queued  int    // bytes in queue
	lost    uint64 // dropped since the last notice went out
	sending int    // bytes taken by the sender, not yet written

	dropped atomic.Uint64 // dropped, ever
	shipped atomic.Uint64 // lines written to the host, ever
	reached atomic.Bool   // a connection to the host succeeded, ever
	wake    chan struct{}
	idle    chan struct{} // closed and replaced whenever the queue empties
	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}
}

// New starts a Shipper: it dials the host at once and whenever its
// connection ends.
func New(cfg Config) (*Shipper, error) {
	if cfg.Dial == nil {
		return nil, errors.New("logship: no Dial")
	}
	if cfg.MaxBuffer <= 0 {
		cfg.MaxBuffer = DefaultMaxBuffer
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Shipper{
		cfg:    cfg,
		wake:   make(chan struct{}, 1),
		idle:   make(chan struct{}),
		ctx:    ctx,
		cancel: cancel,
		done:   make(chan struct{}),
	}
	go s.run()
	return s, nil
}

// Write queues one log line (zap writes one entry per call). It never
// blocks and never fails: a line that does not fit is dropped and counted.
func (s *Shipper) Write(p []byte) (int, error) {
	s.mu.Lock()
	if s.queued+s.sending+len(p) > s.cfg.MaxBuffer {
		s.lost++
		s.mu.Unlock()
		s.dropped.Add(1)
		return len(p), nil
	}
	s.queue = append(s.queue, append([]byte(nil), p...))
	s.queued += len(p)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	return len(p), nil
}

// Sync does nothing: zap calls it after errors and at exit, and a sync
// that waited for the host would block the caller. Flush waits.
func (s *Shipper) Sync() error { return nil }

// Dropped is the number of lines dropped so far because the host did not
// take them in time.
func (s *Shipper) Dropped() uint64 { return s.dropped.Load() }

// Shipped is the number of lines written to the host so far.
func (s *Shipper) Shipped() uint64 { return s.shipped.Load() }

// Reached reports whether the host was ever reached.
func (s *Shipper) Reached() bool { return s.reached.Load() }

// Flush waits until every queued line has been written to the host, or
// ctx ends (an error also when lines were dropped meanwhile): at exit, so that the last lines (a start-up failure) reach the
// host when it reads.
func (s *Shipper) Flush(ctx context.Context) error {
	before := s.dropped.Load()
	for {
		s.mu.Lock()
		empty := len(s.queue) == 0 && s.sending == 0
		idle := s.idle
		s.mu.Unlock()
		if empty {
			if n := s.dropped.Load() - before; n > 0 {
				return fmt.Errorf("%d log lines dropped while flushing: the host did not take them", n)
			}
			return nil
		}
		select {
		case <-idle:
		case <-ctx.Done():
			return fmt.Errorf("log lines not all sent to the host: %w", ctx.Err())
		case <-s.done:
			return errors.New("log shipper closed")
		}
	}
}

// Close flushes what it can until ctx ends, then stops the sender and
// closes its connection.
func (s *Shipper) Close(ctx context.Context) error {
	err := s.Flush(ctx)
	s.cancel()
	<-s.done
	return err
}

// batch is what one write sends: a notice of lost lines (notice > 0),
// then lines.
type batch struct {
	b      []byte
	head   int // bytes of the notice at the start of b
	notice uint64
	lines  [][]byte
}

// take removes the queued lines, preceded by a notice of the lines lost
// since the last one, as one batch to write (nil: nothing queued).
func (s *Shipper) take() *batch {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.queue) == 0 {
		return nil
	}
	bt := &batch{lines: s.queue, notice: s.lost}
	if s.lost > 0 {
		bt.b = fmt.Appendf(bt.b, `{"level":"warn","ts":%.6f,"logger":"logship","msg":"enclave log lines dropped: the host did not read them in time","dropped":%d}`+"\n",
			float64(time.Now().UnixNano())/1e9, s.lost)
		bt.head = len(bt.b)
		s.lost = 0
	}
	for _, l := range s.queue {
		bt.b = append(bt.b, l...)
	}
	s.queue, s.queued = nil, 0
	s.sending = len(bt.b)
	return bt
}

// sent records the end of a batch's write, n bytes of which went out.
// Lines not wholly written go back to the front of the queue (the
// connection is redialled), as far as the bound allows; the rest are lost
// and counted.
func (s *Shipper) sent(bt *batch, n int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sending = 0
	done := 0 // lines wholly written
	if ok {
		done = len(bt.lines)
	} else {
		if n < bt.head {
			s.lost += bt.notice // the notice goes again
		}
		for off := bt.head; done < len(bt.lines) && off+len(bt.lines[done]) <= n; done++ {
			off += len(bt.lines[done])
		}
	}
	s.shipped.Add(uint64(done))
	if rest := bt.lines[done:]; len(rest) > 0 {
		size := 0
		for _, l := range rest {
			size += len(l)
		}
		// Oldest first out when everything does not fit.
		for len(rest) > 0 && size+s.queued > s.cfg.MaxBuffer {
			size -= len(rest[0])
			rest = rest[1:]
			s.lost++
			s.dropped.Add(1)
		}
		s.queue = append(rest[:len(rest):len(rest)], s.queue...)
		s.queued += size
	}
	if len(s.queue) == 0 {
		close(s.idle)
		s.idle = make(chan struct{})
	}
}

// run dials the host and writes what is queued, until Close.
func (s *Shipper) run() {
	defer close(s.done)
	var conn net.Conn
	unwatch := func() bool { return false }
	drop := func() {
		unwatch()
		_ = conn.Close()
		conn = nil
	}
	defer func() {
		if conn != nil {
			drop()
		}
	}()
	backoff := backoffMin
	for {
		select {
		case <-s.wake:
		case <-s.ctx.Done():
			return
		}
		for s.ctx.Err() == nil {
			if conn == nil {
				c, err := s.cfg.Dial(s.ctx)
				if err != nil {
					// No host yet: lines queue (and drop once the queue
					// is full) until one listens.
					t := time.NewTimer(backoff)
					select {
					case <-t.C:
					case <-s.ctx.Done():
						t.Stop()
						return
					}
					backoff = min(2*backoff, backoffMax)
					continue
				}
				conn, backoff = c, backoffMin
				// Close unblocks a write to a host that does not read.
				unwatch = context.AfterFunc(s.ctx, func() { _ = c.Close() })
				s.reached.Store(true)
			}
			bt := s.take()
			if bt == nil {
				break
			}
			_ = conn.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
			n, err := conn.Write(bt.b)
			s.sent(bt, n, err == nil)
			if err != nil {
				drop()
			}
		}
	}
}

// Core is a zap core that writes enabled entries to s as JSON lines (time
// as Unix seconds, the encoder's production defaults), whatever format the
// process's own log has: the host parses them (host/enclavelog).
func (s *Shipper) Core(enab zapcore.LevelEnabler) zapcore.Core {
	return zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), s, enab)
}
