// Package proxy serves gRPC on TCP and forwards every call, transparently,
// to the enclave signer (or several) over long-lived vsock connections.
//
// The proxy does not terminate gRPC: it relays HTTP/2 streams (relay.go).
// Each client stream becomes a stream on one of the pooled upstream
// connections (lanes, lane.go): headers are re-encoded, message bytes are
// copied as they are, and flow control is kept on both sides. Any method
// is forwarded, unary or streaming, with its metadata, deadline and
// cancellation; the enclave's headers, trailers and status (code, message,
// details) come back unchanged. The proxy's only own service is
// grpc.health.v1.Health for service "" (see healthServer), served by an
// in-process gRPC server that the relay reaches like an upstream; other
// health services and reflection reach the enclave, so grpcurl through the
// proxy lists the enclave's services.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthgrpc "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/internal/limits"
	"github.com/nitrosign/nitrosign/internal/tlsconfig"
)

// Observer is told about every call the proxy serves and every forwarded
// call that failed upstream; *metrics.Metrics implements it. Its methods
// run on the call path: they must be quick and safe for concurrent use.
type Observer interface {
	// CallStarted is called when a call arrives, CallFinished when its
	// status is known; method is the full method name the client called.
	CallStarted(method string)
	CallFinished(method string, code codes.Code, elapsed time.Duration)
	// UpstreamError is called once per forwarded call that failed because
	// of the upstream hop or the enclave, with a metrics.Reason* constant.
	UpstreamError(reason string)
}

var _ Observer = (*metrics.Metrics)(nil)

type nopObserver struct{}

func (nopObserver) CallStarted(string)                             {}
func (nopObserver) CallFinished(string, codes.Code, time.Duration) {}
func (nopObserver) UpstreamError(string)                           {}

// Option adds to what New builds.
type Option func(*options)

type options struct {
	observer Observer
}

// WithObserver reports every call to o (metrics). Default: nothing.
func WithObserver(o Observer) Option {
	return func(opts *options) {
		if o != nil {
			opts.observer = o
		}
	}
}

// Proxy relays gRPC calls to its upstreams. Create it with New, run it with
// Serve, end it with Stop.
type Proxy struct {
	cfg      Config
	log      *zap.Logger
	debug    bool // calls are logged
	ups      *Upstreams
	health   *healthServer
	obs      Observer
	tls      *tlsconfig.Server // nil: plaintext
	tlsConf  *tls.Config
	inFlight *limits.InFlight
	tlsLogs  *limits.Throttle // refused handshakes, logged once a second
	unary    map[string]bool  // known unary methods (default deadline)
	// oneRequest: known methods whose request is one message (unary and
	// server-streaming), launched upstream only once complete.
	oneRequest map[string]bool
	// mem counts every byte the relay buffers (Config.MemoryBudget).
	mem account

	local    *Upstreams // in-memory connection to the proxy's health server
	retries  atomic.Uint64
	localSrv *grpc.Server // serves healthServer
	localL   *pipeListener

	stopping chan struct{} // closed when Stop begins

	mu        sync.Mutex
	stopped   bool
	addr      net.Addr
	listeners map[net.Listener]struct{}
	conns     map[*srvConn]struct{}
	connWG    sync.WaitGroup
	serving   sync.WaitGroup
	active    atomic.Int32 // Serve calls running

	startOnce sync.Once
	stopOnce  sync.Once
	stopErr   error
}

// New builds a proxy forwarding to ups; it does not listen or serve. It
// starts ups's connections; the proxy owns ups from then on and closes it
// in Stop (if New fails, the caller still owns it). With cfg.TLS set it
// loads the certificate now. A proxy that is built must be stopped, served
// or not.
func New(cfg Config, ups *Upstreams, log *zap.Logger, opts ...Option) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("proxy config: %w", err)
	}
	if ups == nil {
		return nil, errors.New("proxy: nil upstreams")
	}
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("proxy")
	o := options{observer: nopObserver{}}
	for _, opt := range opts {
		opt(&o)
	}
	p := &Proxy{
		cfg:        cfg,
		log:        log,
		debug:      debugEnabled(log),
		ups:        ups,
		obs:        o.observer,
		unary:      unaryMethods(),
		oneRequest: oneRequestMethods(),
		stopping:   make(chan struct{}),
		listeners:  map[net.Listener]struct{}{},
		conns:      map[*srvConn]struct{}{},
	}
	if cfg.TLS.Enabled() {
		// Before anything starts: a bad file fails New with nothing to
		// undo.
		var err error
		if p.tls, err = tlsconfig.NewServer(cfg.TLS, log); err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
		p.tlsConf = h2TLSConfig(p.tls.TLSConfig())
	}
	p.inFlight = newInFlight(cfg, log, p.obs)
	p.tlsLogs = limits.NewThrottle(time.Second)
	p.health = newHealthServer(ups, log.Named("health"))

	p.localL = newPipeListener()
	// The in-process server's stream limit is not what bounds health
	// calls: each client connection's share (MaxConnectionCalls) does, and
	// Check of "" never reaches it (call.answerHealth).
	p.localSrv = grpc.NewServer(grpc.MaxConcurrentStreams(math.MaxUint32))
	healthgrpc.RegisterHealthServer(p.localSrv, p.health)
	// An in-memory connection cannot be half open: no keepalive pings
	// (which the server would count as strikes and answer with GOAWAY),
	// no health watch, no keyset.
	p.local = newUpstreamSet(cfg.Pool, log.Named("local"))
	p.local.add("proxy health service", "proxy-local", p.localL.dial, 1, 0, false, false)
	ups.OnStateChange(p.health.setReady)

	switch {
	case isLoopback(cfg.Listen):
	case p.tls == nil:
		log.Warn("PROXY SERVES PLAINTEXT BEYOND LOOPBACK (--insecure): no TLS and no authentication; "+
			"anyone who can reach the port can use the enclave's signing keys. Use --tls-cert/--tls-key/--client-ca, "+
			"or bind 127.0.0.1, or firewall the port.",
			zap.String("listen", cfg.Listen))
	case !cfg.TLS.MutualTLS():
		log.Warn("proxy listens beyond loopback with TLS but without client certificates: anyone who can reach "+
			"the port can use the enclave's signing keys; add --client-ca for mutual TLS or firewall the port",
			zap.String("listen", cfg.Listen))
	}
	return p, nil
}

// start starts, once, what New only prepared: the in-process health
// server and every upstream connection. Serve calls it, so a proxy whose
// app never starts (another component's start failing first) leaves
// nothing running.
func (p *Proxy) start() {
	p.startOnce.Do(func() {
		go func() { _ = p.localSrv.Serve(p.localL) }()
		p.local.start(&p.mem)
		p.ups.start(&p.mem)
		// The in-memory connection is up at once; a health List or Watch
		// that arrives first must not find it missing.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := p.local.WaitReady(ctx); err != nil && !p.isStopped() {
			p.log.Error("the proxy's own health service did not start", zap.Error(err))
		}
	})
}

func (p *Proxy) isStopped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stopped
}

// h2TLSConfig makes every handshake of base offer HTTP/2 (ALPN "h2"),
// which gRPC clients require.
func h2TLSConfig(base *tls.Config) *tls.Config {
	c := base.Clone()
	c.NextProtos = []string{"h2"}
	if get := base.GetConfigForClient; get != nil {
		c.GetConfigForClient = func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			cc, err := get(hi)
			if err != nil || cc == nil {
				return cc, err
			}
			cc.NextProtos = []string{"h2"}
			return cc, nil
		}
	}
	return c
}

// ReloadTLS re-reads the TLS certificate, key and client CA bundle (on
// SIGHUP). Established connections are kept; new handshakes use the new
// files. A failed reload keeps the previous certificate and returns why.
// Without TLS it does nothing.
func (p *Proxy) ReloadTLS() error {
	if p.tls == nil {
		return nil
	}
	return p.tls.Reload()
}

// TLSEnabled reports whether the external port serves TLS.
func (p *Proxy) TLSEnabled() bool { return p.tls != nil }

// Serve serves gRPC on l until Stop; it returns nil after Stop and the
// listener's error otherwise. It closes l.
func (p *Proxy) Serve(l net.Listener) error {
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		_ = l.Close()
		return nil
	}
	p.serving.Add(1)
	if p.addr == nil {
		p.addr = l.Addr()
	}
	p.listeners[l] = struct{}{}
	p.active.Add(1)
	p.mu.Unlock()
	defer p.serving.Done()
	defer p.active.Add(-1)
	p.start()
	defer func() {
		p.mu.Lock()
		delete(p.listeners, l)
		p.mu.Unlock()
		_ = l.Close()
	}()

	p.log.Info("proxy serving", zap.Stringer("listen", l.Addr()), zap.Strings("upstreams", p.ups.Targets()),
		zap.Int("pool_size", p.cfg.Pool.Size))
	ll := p.limitListener(l)
	var delay time.Duration
	for {
		nc, err := ll.Accept()
		if err != nil {
			p.mu.Lock()
			stopped := p.stopped
			p.mu.Unlock()
			if stopped {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("proxy: serve on %s: %w", l.Addr(), err)
			}
			// A transient accept error (out of file descriptors): back
			// off and go on, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			p.log.Warn("accept failed; retrying", zap.Error(err), zap.Duration("in", delay))
			select {
			case <-time.After(delay):
			case <-p.stopping:
				return nil
			}
			continue
		}
		delay = 0
		p.mu.Lock()
		if p.stopped {
			p.mu.Unlock()
			_ = nc.Close()
			return nil
		}
		p.connWG.Add(1) // under mu: Stop waits only after stopped is set
		p.mu.Unlock()
		go func() {
			defer p.connWG.Done()
			p.serveConn(nc)
		}()
	}
}

// track adds (or removes) a client connection; it refuses once stopping.
func (p *Proxy) track(sc *srvConn, add bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !add {
		delete(p.conns, sc)
		return true
	}
	if p.stopped {
		return false
	}
	p.conns[sc] = struct{}{}
	return true
}

// upstreamBusyWait is how long a call waits for a lane when every ready
// one is full or congested; the client's reader waits with it
// (backpressure), then the call gets ResourceExhausted.
const upstreamBusyWait = 50 * time.Millisecond

// routeSet is where a method goes: the enclaves, or the proxy's own health
// server for the proxy's health (List, and Watch of service ""). req is
// the request, when complete.
func (p *Proxy) routeSet(method string, req []byte) *Upstreams {
	switch method {
	case limits.HealthPrefix + "List":
		return p.local
	case healthCheckMethod, healthWatchMethod:
		if svc, ok := healthService(req); !ok || svc == "" {
			return p.local // the proxy itself (or a request its server rejects)
		}
	}
	return p.ups
}

// route picks a lane of set not in av, waiting up to upstreamBusyWait
// (and never past deadline) while every lane is busy; b, the waiting
// reader's batch, is flushed first.
func (p *Proxy) route(b *flushBatch, set *Upstreams, av avoid, deadline time.Time) (*lane, error) {
	ln, err := set.pick(av)
	if !errors.Is(err, errUpstreamBusy) {
		return ln, err
	}
	if b != nil {
		b.flush()
	}
	until := time.Now().Add(upstreamBusyWait)
	if !deadline.IsZero() && deadline.Before(until) {
		until = deadline
	}
	for time.Now().Before(until) {
		time.Sleep(time.Millisecond)
		if ln, err = set.pick(av); !errors.Is(err, errUpstreamBusy) {
			return ln, err
		}
	}
	return nil, err
}

// Ready is the number of upstream slots that take calls: connected, the
// enclave SERVING, and its keyset the one in rotation.
func (p *Proxy) Ready() int { return p.ups.Ready() }

// Size is the number of upstream slots, across upstreams.
func (p *Proxy) Size() int { return p.ups.Size() }

// OnStateChange calls fn with Ready now and at every change of it (health
// "" and systemd readiness follow it).
func (p *Proxy) OnStateChange(fn func(ready int)) { p.ups.OnStateChange(fn) }

// UpstreamCalls returns how many streams each upstream slot has carried
// since New, slot by slot, upstream by upstream.
func (p *Proxy) UpstreamCalls() []uint64 {
	var out []uint64
	for _, s := range p.ups.Stats() {
		out = append(out, s.Calls)
	}
	return out
}

// Retries is the number of calls relaunched on another upstream
// connection because theirs refused them or was lost before they began.
func (p *Proxy) Retries() uint64 { return p.retries.Load() }

// Buffered is the number of bytes the relay holds now across all
// connections (frames queued both ways, requests waiting to be complete,
// responses waiting for a client's window): what Config.MemoryBudget
// bounds.
func (p *Proxy) Buffered() int64 { return p.mem.load() }

// UpstreamConnects returns how many upstream connections the relay has
// established since New: the pool's size once all are up; more means a
// connection was lost or replaced.
func (p *Proxy) UpstreamConnects() uint64 {
	var n uint64
	for _, s := range p.ups.Stats() {
		n += s.Readies
	}
	return n
}

// Alive reports an error when the proxy is not serving any listener (the
// systemd watchdog asks). It does not look at the enclave: a proxy whose
// enclave is down is alive, and says so through its health service.
func (p *Proxy) Alive() error {
	if p.active.Load() == 0 {
		return errors.New("proxy: not serving")
	}
	return nil
}

// Addr is the address of the first listener served, nil before Serve.
func (p *Proxy) Addr() net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.addr
}

// clientConns is the client connections open now.
func (p *Proxy) clientConns() []*srvConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	conns := make([]*srvConn, 0, len(p.conns))
	for sc := range p.conns {
		conns = append(conns, sc)
	}
	return conns
}

// endEnclaveWatches ends every health Watch relayed to an enclave with
// Unavailable, as the proxy's own watches end: a Watch never ends by
// itself, and a graceful stop must not wait for it.
func (p *Proxy) endEnclaveWatches() {
	for _, sc := range p.clientConns() {
		sc.mu.Lock()
		var watches []*call
		for _, c := range sc.calls {
			if c.method == healthWatchMethod {
				watches = append(watches, c)
			}
		}
		sc.mu.Unlock()
		for _, c := range watches {
			if ln, _ := c.lane(); ln != nil && ln.slot.up.set == p.ups && !c.finished.Load() {
				c.fail(codes.Unavailable, "proxy is shutting down")
			}
		}
	}
}

// Stop drains and stops: health "" turns NOT_SERVING and health watches
// end, listeners close, every client connection gets GOAWAY and its calls
// in flight may finish for up to GracefulStopTimeout (or until ctx ends);
// then what is left is cut, and the upstream connections close. It is
// idempotent.
func (p *Proxy) Stop(ctx context.Context) error {
	p.stopOnce.Do(func() {
		p.mu.Lock()
		p.stopped = true
		for l := range p.listeners {
			_ = l.Close()
		}
		p.mu.Unlock()

		p.health.drain()
		p.endEnclaveWatches()
		close(p.stopping) // every connection's keeper sends GOAWAY
		ctx, cancel := context.WithTimeout(ctx, p.cfg.GracefulStopTimeout)
		defer cancel()
		done := make(chan struct{})
		go func() {
			p.connWG.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-ctx.Done():
			p.log.Warn("graceful stop timed out: cutting calls still in flight", zap.Error(ctx.Err()))
			for _, sc := range p.clientConns() {
				sc.ep.fail(errors.New("proxy stopped"))
			}
			<-done
		}
		p.serving.Wait()
		p.stopErr = p.ups.Close()
		_ = p.local.Close()
		p.localSrv.Stop()
		_ = p.localL.Close()
		p.log.Info("proxy stopped")
	})
	return p.stopErr
}
