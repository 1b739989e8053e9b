// Package pool keeps N long-lived gRPC connections to one upstream (the
// enclave signer, over vsock) and spreads calls over the ready ones.
//
// A Pool is a grpc.ClientConnInterface, so generated clients work on it
// unchanged: pb.NewSignerServiceClient(pool). Each call goes to the
// least-loaded READY connection; when none is READY the call fails at once
// with codes.Unavailable instead of waiting for a reconnect, so a dead or
// not-yet-serving enclave never makes callers hang.
package pool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/health" // registers the client-side health-check producer used by healthCheckConfig
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/internal/target"
)

// ErrNoReadyConn is wrapped by the error of a call made while no connection is
// READY. The error is also a gRPC status error with codes.Unavailable.
var ErrNoReadyConn = errors.New("no ready upstream connection")

// ErrClosed is wrapped by the error of a call made after Close, and returned
// by WaitReady after Close. The call error is also codes.Unavailable.
var ErrClosed = errors.New("pool closed")

// unavailableError is a domain error that knows its gRPC status, so callers
// can test it with errors.Is and a gRPC server returns it as Unavailable.
type unavailableError struct {
	cause error
	msg   string
}

func (e *unavailableError) Error() string { return e.msg }
func (e *unavailableError) Unwrap() error { return e.cause }
func (e *unavailableError) GRPCStatus() *status.Status {
	return status.New(codes.Unavailable, e.msg)
}

// Service configs. round_robin is the policy that enables client-side health
// checking in grpc-go (pick_first does not); with one address per ClientConn
// it simply means "this one connection, when healthy". Service "" asks for
// the upstream server's overall health.
const (
	serviceConfigHealth   = `{"loadBalancingConfig":[{"round_robin":{}}],"healthCheckConfig":{"serviceName":""}}`
	serviceConfigNoHealth = `{"loadBalancingConfig":[{"round_robin":{}}]}`
)

// ConnStats is a snapshot of one pooled connection.
type ConnStats struct {
	// Index is the connection's position in the pool, 0..Size-1.
	Index int
	// State is the connection's last observed connectivity state.
	State connectivity.State
	// InFlight is the number of calls and streams now running on it.
	InFlight int64
	// Calls is the number of calls and streams ever started on it.
	Calls uint64
	// Readies counts how many times it became READY (1 + reconnections).
	Readies uint64
	// Dials counts connection attempts through the pool's dialer (the
	// first one and every redial after a failure or a lost connection).
	Dials uint64
	// DialErrors counts the attempts whose dial failed (the transport
	// connect; a failed HTTP/2 handshake after it is not counted here).
	DialErrors uint64
}

// conn is one pooled ClientConn with its counters.
type conn struct {
	idx      int
	cc       *grpc.ClientConn
	state    atomic.Int32 // connectivity.State
	inFlight atomic.Int64
	calls    atomic.Uint64
	readies  atomic.Uint64
	dials    atomic.Uint64
	dialErrs atomic.Uint64
}

// countDials wraps the dialer so the pool knows how often it (re)dials.
func (c *conn) countDials(dial func(context.Context, string) (net.Conn, error)) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		c.dials.Add(1)
		nc, err := dial(ctx, addr)
		if err != nil {
			c.dialErrs.Add(1)
		}
		return nc, err
	}
}

func (c *conn) release() { c.inFlight.Add(-1) }

// Pool is a fixed set of connections to one upstream. It is safe for
// concurrent use.
type Pool struct {
	target target.Target
	log    *zap.Logger
	conns  []*conn

	// next rotates the starting point of the least-loaded scan, so that
	// equally loaded connections are taken in turn.
	next atomic.Uint64

	ctx    context.Context // ends on Close; stops the watchers
	cancel context.CancelFunc
	wg     sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
	closed    atomic.Bool

	// mu guards ready (the count last told to subscribers), changed and
	// subs. notifyMu serialises notify, so subscribers see changes in order.
	notifyMu sync.Mutex
	mu       sync.Mutex
	ready    int
	changed  chan struct{} // closed and replaced on every state change
	subs     []func(ready int)
}

var _ grpc.ClientConnInterface = (*Pool)(nil)

// New creates cfg.Size connections to t and starts connecting them at once.
// extra dial options are appended after the pool's own (tests use them to
// inject a transport or a buffer pool). New does not wait for a connection:
// use WaitReady for that. Close releases everything.
func New(t target.Target, cfg Config, log *zap.Logger, extra ...grpc.DialOption) (*Pool, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("pool config: %w", err)
	}
	if t.Scheme == "" {
		return nil, fmt.Errorf("pool: %w: empty target", target.ErrInvalid)
	}
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("pool").With(zap.Stringer("upstream", t))

	opts := dialOptions(t, cfg)

	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{
		target:  t,
		log:     log,
		ctx:     ctx,
		cancel:  cancel,
		changed: make(chan struct{}),
	}
	for i := range cfg.Size {
		c := &conn{idx: i}
		// Each connection dials through its own counting dialer; extra
		// options come last and may replace it (tests inject transports).
		copts := append(opts[:len(opts):len(opts)], grpc.WithContextDialer(c.countDials(t.Dialer())))
		copts = append(copts, extra...)
		cc, err := grpc.NewClient(t.GRPCTarget(), copts...)
		if err != nil {
			cancel()
			for _, c := range p.conns {
				_ = c.cc.Close()
			}
			return nil, fmt.Errorf("pool: connection %d to %s: %w", i, t, err)
		}
		c.cc = cc
		c.state.Store(int32(cc.GetState()))
		p.conns = append(p.conns, c)
	}
	for _, c := range p.conns {
		c.cc.Connect()
		p.wg.Add(1)
		go p.watch(c)
	}
	log.Info("connection pool started", zap.Int("size", cfg.Size), zap.Bool("health_check", cfg.HealthCheck))
	return p, nil
}

func dialOptions(t target.Target, cfg Config) []grpc.DialOption {
	sc := serviceConfigNoHealth
	if cfg.HealthCheck {
		sc = serviceConfigHealth
	}
	opts := []grpc.DialOption{
		// The dialer is added per connection, in New.
		// The vsock hop never leaves the instance; TLS belongs on the
		// proxy's external port.
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Pooled connections are long-lived by design: an idle channel would
		// drop its connection and make the next caller pay the reconnect.
		grpc.WithIdleTimeout(0),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  cfg.BackoffBase,
				Multiplier: cfg.BackoffMultiplier,
				Jitter:     cfg.BackoffJitter,
				MaxDelay:   cfg.BackoffMax,
			},
			MinConnectTimeout: cfg.ConnectTimeout,
		}),
		grpc.WithDefaultServiceConfig(sc),
	}
	if cfg.KeepaliveTime > 0 {
		opts = append(opts, grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:    cfg.KeepaliveTime,
			Timeout: cfg.KeepaliveTimeout,
			// Health checking keeps a Watch stream open on every connection,
			// so pings always have a stream; without it, an idle connection
			// must not ping (the server would count strikes).
			PermitWithoutStream: false,
		}))
	}
	return opts
}

// watch follows one connection's state until Close.
func (p *Pool) watch(c *conn) {
	defer p.wg.Done()
	s := c.cc.GetState()
	for {
		p.setState(c, s)
		if !c.cc.WaitForStateChange(p.ctx, s) {
			return // pool closed
		}
		s = c.cc.GetState()
	}
}

func (p *Pool) setState(c *conn, s connectivity.State) {
	old := connectivity.State(c.state.Swap(int32(s)))
	if old == s {
		return
	}
	switch {
	case s == connectivity.Ready:
		c.readies.Add(1)
		p.log.Info("upstream connection ready", zap.Int("conn", c.idx))
	case old == connectivity.Ready:
		p.log.Warn("upstream connection lost", zap.Int("conn", c.idx), zap.Stringer("state", s))
	case s == connectivity.TransientFailure:
		// Sticky until the next READY, so this logs once per outage.
		p.log.Warn("upstream connection failing: enclave unreachable or not serving; retrying with backoff",
			zap.Int("conn", c.idx))
	default:
		p.log.Debug("upstream connection state", zap.Int("conn", c.idx), zap.Stringer("state", s))
	}
	p.notify()
}

// notify wakes WaitReady after any state change, and tells subscribers
// when the ready count changed. It runs after the state's atomic store, so
// the last notify to run sees the final count.
func (p *Pool) notify() {
	p.notifyMu.Lock()
	defer p.notifyMu.Unlock()
	n := p.Ready()
	p.mu.Lock()
	close(p.changed)
	p.changed = make(chan struct{})
	if n == p.ready {
		p.mu.Unlock()
		return
	}
	p.ready = n
	subs := append([]func(int){}, p.subs...)
	p.mu.Unlock()
	for _, fn := range subs {
		fn(n)
	}
}

// Ready returns how many connections are READY now.
func (p *Pool) Ready() int {
	if p.closed.Load() {
		return 0
	}
	n := 0
	for _, c := range p.conns {
		if connectivity.State(c.state.Load()) == connectivity.Ready {
			n++
		}
	}
	return n
}

// ConnReady reports whether connection i (0..Size-1) is READY, which with
// health checking means the enclave behind it says SERVING.
func (p *Pool) ConnReady(i int) bool {
	return i >= 0 && i < len(p.conns) && connectivity.State(p.conns[i].state.Load()) == connectivity.Ready
}

// Size returns the number of connections.
func (p *Pool) Size() int { return len(p.conns) }

// Target returns the upstream address.
func (p *Pool) Target() target.Target { return p.target }

// Stats returns a snapshot of every connection, in index order.
func (p *Pool) Stats() []ConnStats {
	out := make([]ConnStats, len(p.conns))
	for i, c := range p.conns {
		out[i] = ConnStats{
			Index:    c.idx,
			State:    connectivity.State(c.state.Load()),
			InFlight: c.inFlight.Load(),
			Calls:    c.calls.Load(),
			Readies:  c.readies.Load(),

			Dials:      c.dials.Load(),
			DialErrors: c.dialErrs.Load(),
		}
	}
	return out
}

// OnStateChange registers fn to be called with the number of READY
// connections whenever it changes, and once right away with the current
// number. Calls are serialised and in order. fn runs on a pool goroutine: it
// must be quick and must not call OnStateChange.
func (p *Pool) OnStateChange(fn func(ready int)) {
	p.notifyMu.Lock()
	defer p.notifyMu.Unlock()
	p.mu.Lock()
	p.subs = append(p.subs, fn)
	n := p.ready
	p.mu.Unlock()
	fn(n)
}

// WaitReady blocks until at least one connection is READY, ctx ends (its
// error is returned) or the pool is closed (ErrClosed).
func (p *Pool) WaitReady(ctx context.Context) error {
	for {
		// Take the channel before looking: a change after the look closes it.
		p.mu.Lock()
		ch := p.changed
		p.mu.Unlock()
		if p.closed.Load() {
			return ErrClosed
		}
		if p.Ready() > 0 {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for a ready connection to %s: %w", p.target, ctx.Err())
		case <-p.ctx.Done():
			return ErrClosed
		}
	}
}

// pick returns the least-loaded READY connection, with its in-flight count
// already raised, or a codes.Unavailable error when there is none.
func (p *Pool) pick() (*conn, error) {
	if p.closed.Load() {
		return nil, &unavailableError{
			cause: ErrClosed,
			msg:   fmt.Sprintf("connection pool to %s is closed", p.target),
		}
	}
	n := len(p.conns)
	start := int(p.next.Add(1) % uint64(n))
	var best *conn
	bestLoad := int64(math.MaxInt64)
	for i := range n {
		c := p.conns[(start+i)%n]
		if connectivity.State(c.state.Load()) != connectivity.Ready {
			continue
		}
		// Strictly less: among equals the first seen from the rotating
		// start wins, which is round-robin.
		if l := c.inFlight.Load(); l < bestLoad {
			best, bestLoad = c, l
		}
	}
	if best == nil {
		return nil, &unavailableError{
			cause: ErrNoReadyConn,
			msg:   fmt.Sprintf("no ready upstream connection to %s: enclave down or not serving", p.target),
		}
	}
	// Load is read and raised without a lock: two concurrent picks may both
	// choose the same connection, which costs a little balance, not
	// correctness.
	best.inFlight.Add(1)
	best.calls.Add(1)
	return best, nil
}

// Invoke runs a unary call on the least-loaded READY connection.
func (p *Pool) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	c, err := p.pick()
	if err != nil {
		return err
	}
	defer c.release()
	return c.cc.Invoke(ctx, method, args, reply, opts...)
}

// NewStream starts a stream on the least-loaded READY connection. The stream
// counts as in flight until RecvMsg returns an error (io.EOF included), a
// SendMsg fails, or ctx ends, whichever comes first.
func (p *Pool) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	c, err := p.pick()
	if err != nil {
		return nil, err
	}
	cs, err := c.cc.NewStream(ctx, desc, method, opts...)
	if err != nil {
		c.release()
		return nil, err
	}
	s := &stream{ClientStream: cs, conn: c, serverStreams: desc.ServerStreams}
	// If ctx is already done, finish may run (on another goroutine) before
	// AfterFunc returns: hence the lock around stop.
	stop := context.AfterFunc(ctx, s.finish)
	s.mu.Lock()
	s.stop = stop
	s.mu.Unlock()
	return s, nil
}

// stream releases its connection's in-flight slot exactly once when the
// stream is over.
type stream struct {
	grpc.ClientStream
	conn          *conn
	serverStreams bool
	once          sync.Once

	mu   sync.Mutex
	stop func() bool // unregisters the ctx AfterFunc
}

func (s *stream) finish() {
	s.once.Do(func() {
		s.conn.release()
		s.mu.Lock()
		stop := s.stop
		s.mu.Unlock()
		if stop != nil {
			stop() // unregister: a long-lived ctx would keep the stream reachable
		}
	})
}

func (s *stream) SendMsg(m any) error {
	err := s.ClientStream.SendMsg(m)
	// io.EOF means the server ended the stream; the caller learns the status
	// from RecvMsg, which releases then. Any other error ends the stream now.
	if err != nil && !errors.Is(err, io.EOF) {
		s.finish()
	}
	return err
}

func (s *stream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	// A non-server-streaming call is over after its one response.
	if err != nil || !s.serverStreams {
		s.finish()
	}
	return err
}

// Close stops the watchers and closes every connection; calls in flight
// fail. It is idempotent and returns the first Close error.
func (p *Pool) Close() error {
	p.closeOnce.Do(func() {
		p.closed.Store(true)
		p.cancel()
		var errs []error
		for _, c := range p.conns {
			if err := c.cc.Close(); err != nil {
				errs = append(errs, fmt.Errorf("conn %d: %w", c.idx, err))
			}
		}
		p.wg.Wait()
		for _, c := range p.conns {
			c.state.Store(int32(connectivity.Shutdown))
		}
		p.notify()
		p.closeErr = errors.Join(errs...)
		p.log.Info("connection pool closed")
	})
	return p.closeErr
}
