// Package proxy serves gRPC on TCP and forwards every call, transparently,
// to the enclave signer over a pool of long-lived vsock connections.
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
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthgrpc "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/pool"
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

// Proxy relays gRPC calls to a pool. Create it with New, run it with
// Serve, end it with Stop.
type Proxy struct {
	cfg      Config
	log      *zap.Logger
	debug    bool // calls are logged
	pool     *pool.Pool
	health   *healthServer
	obs      Observer
	tls      *tlsconfig.Server // nil: plaintext
	tlsConf  *tls.Config
	inFlight *limits.InFlight
	unary    map[string]bool // known unary methods (default deadline)
	// oneRequest: known methods whose request is one message (unary and
	// server-streaming), launched upstream only once complete.
	oneRequest map[string]bool
	// mem counts every byte the relay buffers (Config.MemoryBudget).
	mem account

	enclave  *laneSet     // data connections to the enclave
	local    *laneSet     // in-memory connection to the proxy's health server
	localSrv *grpc.Server // serves healthServer
	localL   *pipeListener

	stopping chan struct{} // closed when Stop begins

	readyMu   sync.Mutex
	lastReady int
	readySubs []func(int)

	mu        sync.Mutex
	stopped   bool
	addr      net.Addr
	listeners map[net.Listener]struct{}
	conns     map[*srvConn]struct{}
	connWG    sync.WaitGroup
	serving   sync.WaitGroup
	active    atomic.Int32 // Serve calls running

	stopOnce sync.Once
	stopErr  error
}

// New builds a proxy forwarding to up; it does not listen or serve. The
// proxy owns up from then on and closes it in Stop (if New fails, the
// caller still owns it). up's connections health-check the enclave; the
// relay's data connections (one per pool slot, dialled to the same target)
// take calls only while their slot's connection is READY. With cfg.TLS set
// it loads the certificate now. A proxy that is built must be stopped,
// served or not.
func New(cfg Config, up *pool.Pool, log *zap.Logger, opts ...Option) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("proxy config: %w", err)
	}
	if up == nil {
		return nil, errors.New("proxy: nil upstream pool")
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
		pool:       up,
		obs:        o.observer,
		unary:      unaryMethods(),
		oneRequest: oneRequestMethods(),
		stopping:   make(chan struct{}),
		listeners:  map[net.Listener]struct{}{},
		conns:      map[*srvConn]struct{}{},
	}
	if cfg.TLS.Enabled() {
		// Before anything subscribes to the pool: a bad file fails New
		// with nothing to undo.
		var err error
		if p.tls, err = tlsconfig.NewServer(cfg.TLS, log); err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
		p.tlsConf = h2TLSConfig(p.tls.TLSConfig())
	}
	p.inFlight = newInFlight(cfg, log, p.obs)
	p.health = newHealthServer(up, log.Named("health"))

	p.localL = newPipeListener()
	// The in-process server's stream limit is not what bounds health
	// calls: each client connection's share (MaxConnectionCalls) does, and
	// Check of "" never reaches it (call.answerHealth).
	p.localSrv = grpc.NewServer(grpc.MaxConcurrentStreams(math.MaxUint32))
	healthgrpc.RegisterHealthServer(p.localSrv, p.health)
	go func() { _ = p.localSrv.Serve(p.localL) }()
	// An in-memory connection cannot be half open: no keepalive pings
	// (which the server would count as strikes and answer with GOAWAY).
	localCfg := cfg.Pool
	localCfg.KeepaliveTime = 0
	p.local = newLaneSet("proxy health service", 1, p.localL.dial, nil, nil, localCfg, &p.mem, log)
	p.enclave = newLaneSet(up.Target().String(), up.Size(), up.Target().Dial, up.ConnReady, p.readyChanged, cfg.Pool, &p.mem, log)
	p.local.start()
	p.enclave.start()
	up.OnStateChange(func(n int) {
		if n > 0 {
			p.enclave.redialNow()
		}
		p.readyChanged()
	})
	p.OnStateChange(p.health.setReady)

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
	defer func() {
		p.mu.Lock()
		delete(p.listeners, l)
		p.mu.Unlock()
		_ = l.Close()
	}()

	p.log.Info("proxy serving", zap.Stringer("listen", l.Addr()), zap.Stringer("upstream", p.pool.Target()),
		zap.Int("pool_size", p.pool.Size()))
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

// route picks the lane for a method, waiting up to upstreamBusyWait (and
// never past deadline) while every lane is busy.
func (p *Proxy) route(method string, deadline time.Time) (*lane, error) {
	set := p.enclave
	if strings.HasPrefix(method, limits.HealthPrefix) {
		set = p.local
	}
	ln, err := set.pick()
	if !errors.Is(err, errUpstreamBusy) {
		return ln, err
	}
	until := time.Now().Add(upstreamBusyWait)
	if !deadline.IsZero() && deadline.Before(until) {
		until = deadline
	}
	for time.Now().Before(until) {
		time.Sleep(time.Millisecond)
		if ln, err = set.pick(); !errors.Is(err, errUpstreamBusy) {
			return ln, err
		}
	}
	return nil, err
}

// Ready is the number of upstream slots that can take calls: the pool's
// connection is READY (the enclave says SERVING) and the relay's data
// connection beside it is up.
func (p *Proxy) Ready() int {
	if p.enclave == nil {
		return 0
	}
	n := 0
	for i := range p.enclave.slots {
		if l := p.enclave.slots[i].Load(); l != nil && l.ready() && p.pool.ConnReady(i) {
			n++
		}
	}
	return n
}

// Size is the number of upstream slots (the pool's size).
func (p *Proxy) Size() int { return p.pool.Size() }

// OnStateChange calls fn with Ready now and at every change of it (health
// "" and systemd readiness follow it).
func (p *Proxy) OnStateChange(fn func(ready int)) {
	p.readyMu.Lock()
	defer p.readyMu.Unlock()
	p.readySubs = append(p.readySubs, fn)
	fn(p.lastReady)
}

// readyChanged recomputes Ready and tells the subscribers when it changed.
func (p *Proxy) readyChanged() {
	p.readyMu.Lock()
	defer p.readyMu.Unlock()
	n := p.Ready()
	if n == p.lastReady {
		return
	}
	p.lastReady = n
	for _, fn := range p.readySubs {
		fn(n)
	}
}

// UpstreamCalls returns how many calls each upstream connection slot
// (0..pool size-1) has carried since New.
func (p *Proxy) UpstreamCalls() []uint64 {
	out := make([]uint64, len(p.enclave.calls))
	for i := range p.enclave.calls {
		out[i] = p.enclave.calls[i].Load()
	}
	return out
}

// Buffered is the number of bytes the relay holds now across all
// connections (frames queued both ways, requests waiting to be complete,
// responses waiting for a client's window): what Config.MemoryBudget
// bounds.
func (p *Proxy) Buffered() int64 { return p.mem.load() }

// UpstreamConnects returns how many upstream connections the relay has
// established since New: the pool's size once all are up; more means a
// connection was lost or replaced.
func (p *Proxy) UpstreamConnects() uint64 { return p.enclave.dials.Load() }

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

// Stop drains and stops: health "" turns NOT_SERVING and health watches
// end, listeners close, every client connection gets GOAWAY and its calls
// in flight may finish for up to GracefulStopTimeout (or until ctx ends);
// then what is left is cut, and the upstream connections and the pool
// close. It is idempotent and returns the pool's Close error.
func (p *Proxy) Stop(ctx context.Context) error {
	p.stopOnce.Do(func() {
		p.mu.Lock()
		p.stopped = true
		for l := range p.listeners {
			_ = l.Close()
		}
		p.mu.Unlock()

		p.health.drain()
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
			p.mu.Lock()
			conns := make([]*srvConn, 0, len(p.conns))
			for sc := range p.conns {
				conns = append(conns, sc)
			}
			p.mu.Unlock()
			for _, sc := range conns {
				sc.ep.fail(errors.New("proxy stopped"))
			}
			<-done
		}
		p.serving.Wait()
		p.enclave.close()
		p.local.close()
		p.localSrv.Stop()
		_ = p.localL.Close()
		p.stopErr = p.pool.Close()
		p.log.Info("proxy stopped")
	})
	return p.stopErr
}

// outgoingContext carries the incoming metadata of a server call to an
// outgoing call, minus what belongs to the hop.
func outgoingContext(ctx context.Context) context.Context {
	md, _ := metadata.FromIncomingContext(ctx)
	return metadata.NewOutgoingContext(ctx, filterMetadata(md))
}

// hopHeaders are set by each hop's own transport (or describe one hop's
// connection) and must not be copied to the next one. grpc-status,
// grpc-message and grpc-status-details-bin travel in the status the
// handler returns; copying them as trailers would duplicate them.
var hopHeaders = map[string]bool{
	"content-type":               true,
	"user-agent":                 true,
	"te":                         true,
	"host":                       true,
	"connection":                 true,
	"keep-alive":                 true,
	"proxy-connection":           true,
	"transfer-encoding":          true,
	"upgrade":                    true,
	"grpc-timeout":               true,
	"grpc-encoding":              true,
	"grpc-accept-encoding":       true,
	"grpc-previous-rpc-attempts": true,
	"grpc-status":                true,
	"grpc-message":               true,
	"grpc-status-details-bin":    true,
}

// filterMetadata copies md without pseudo-headers (":authority", ...) and
// hop headers. md's keys are already lower-case.
func filterMetadata(md metadata.MD) metadata.MD {
	out := make(metadata.MD, len(md))
	for k, v := range md {
		if k == "" || k[0] == ':' || hopHeaders[k] {
			continue
		}
		out[k] = append([]string(nil), v...)
	}
	return out
}
