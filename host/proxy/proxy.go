// Package proxy serves gRPC on TCP and forwards every call, transparently,
// to the enclave signer over a pool of long-lived vsock connections.
//
// Any method is forwarded (grpc.UnknownServiceHandler), unary or streaming,
// with its metadata, deadline and cancellation; the enclave's headers,
// trailers and status (code, message, details) come back unchanged. Message
// bytes are not decoded and re-encoded: a pass-through codec hands the
// received buffers to the other side. The proxy's only own service is
// grpc.health.v1.Health for service "" (see healthServer); reflection is
// not registered, so reflection calls reach the enclave and grpcurl through
// the proxy lists the enclave's services.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	// A client may compress its requests with gzip (the one compressor
	// every gRPC implementation ships); the proxy must be able to take them.
	// It forwards them uncompressed: the vsock hop is local.
	_ "google.golang.org/grpc/encoding/gzip"
	healthgrpc "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/pool"
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
	server   []grpc.ServerOption
	observer Observer
}

// WithServerOptions appends grpc server options to the proxy's own (tests
// inject a buffer pool with them).
func WithServerOptions(o ...grpc.ServerOption) Option {
	return func(opts *options) { opts.server = append(opts.server, o...) }
}

// WithObserver reports every call to o (metrics). Default: nothing.
func WithObserver(o Observer) Option {
	return func(opts *options) {
		if o != nil {
			opts.observer = o
		}
	}
}

// Proxy is a gRPC server that forwards to a pool. Create it with New, run
// it with Serve, end it with Stop.
type Proxy struct {
	cfg      Config
	log      *zap.Logger
	pool     *pool.Pool
	srv      *grpc.Server
	health   *healthServer
	codec    encoding.CodecV2
	callOpts []grpc.CallOption
	obs      Observer
	tls      *tlsconfig.Server // nil: plaintext

	mu      sync.Mutex
	stopped bool
	addr    net.Addr
	serving sync.WaitGroup
	active  atomic.Int32 // Serve calls running

	stopOnce sync.Once
	stopErr  error
}

// New builds a proxy forwarding to up; it does not listen or serve. The
// proxy owns up from then on and closes it in Stop (if New fails, the
// caller still owns it). With cfg.TLS set it loads the certificate now.
// Its stream workers (idle goroutines) live from New until Stop, so a
// proxy that is built must be stopped, served or not.
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
	c, err := NewCodec()
	if err != nil {
		return nil, err
	}
	p := &Proxy{
		cfg:   cfg,
		log:   log,
		pool:  up,
		codec: c,
		obs:   o.observer,
		callOpts: []grpc.CallOption{
			grpc.ForceCodecV2(c),
			// A response the proxy could not send on is refused upstream,
			// and a request it could not have received is never sent.
			grpc.MaxCallRecvMsgSize(cfg.MaxSendMsgSize),
			grpc.MaxCallSendMsgSize(cfg.MaxRecvMsgSize),
		},
	}
	if cfg.TLS.Enabled() {
		// Before anything subscribes to the pool: a bad file fails New
		// with nothing to undo.
		if p.tls, err = tlsconfig.NewServer(cfg.TLS, log); err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
	}
	p.health = newHealthServer(up, log.Named("health"))
	g := newGuard(cfg, log, p.obs)

	srvOpts := []grpc.ServerOption{
		grpc.ForceServerCodecV2(c),
		grpc.UnknownServiceHandler(p.forward),
		// The request id first, so every later step can log it; then the
		// observer and logging, outside recovery, so they record the code
		// recovery produced.
		// The limits (guard) inside them: a shed call is observed and
		// logged as the ResourceExhausted it was answered with.
		grpc.ChainUnaryInterceptor(requestIDUnary, observeUnary(p.obs), logUnary(log), g.unaryInterceptor, recoverUnary(log)),
		grpc.ChainStreamInterceptor(requestIDStream, observeStream(p.obs), logStream(log), g.streamInterceptor, recoverStream(log)),
		grpc.MaxRecvMsgSize(cfg.MaxRecvMsgSize),
		grpc.MaxSendMsgSize(cfg.MaxSendMsgSize),
		// Calls run on long-lived worker goroutines, not a new goroutine
		// each: a forwarded call's stack outgrows a fresh goroutine's, and
		// growing it by copying was ~8% of the proxy's CPU under load
		// (docs/PERFORMANCE.md). Calls beyond the workers still get a
		// goroutine of their own. Stop ends them.
		grpc.NumStreamWorkers(streamWorkers),
	}
	srvOpts = append(srvOpts, limitOptions(cfg)...)
	if p.tls != nil {
		srvOpts = append(srvOpts, grpc.Creds(p.tls.Credentials()))
	}
	p.srv = grpc.NewServer(append(srvOpts, o.server...)...)
	healthgrpc.RegisterHealthServer(p.srv, p.health)

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
	p.active.Add(1)
	p.mu.Unlock()
	defer p.serving.Done()
	defer p.active.Add(-1)

	p.log.Info("proxy serving", zap.Stringer("listen", l.Addr()), zap.Stringer("upstream", p.pool.Target()),
		zap.Int("pool_size", p.pool.Size()))
	err := p.srv.Serve(p.limitListener(l))
	if err == nil || errors.Is(err, grpc.ErrServerStopped) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return fmt.Errorf("proxy: serve on %s: %w", l.Addr(), err)
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

// Stop drains and stops: health "" turns NOT_SERVING and health watches end,
// GracefulStop lets calls in flight finish for up to GracefulStopTimeout
// (or until ctx ends), then Stop cuts what is left, then the pool closes.
// It is idempotent and returns the pool's Close error.
func (p *Proxy) Stop(ctx context.Context) error {
	p.stopOnce.Do(func() {
		p.mu.Lock()
		p.stopped = true
		p.mu.Unlock()

		p.health.drain()
		ctx, cancel := context.WithTimeout(ctx, p.cfg.GracefulStopTimeout)
		defer cancel()
		done := make(chan struct{})
		go func() {
			p.srv.GracefulStop()
			close(done)
		}()
		select {
		case <-done:
		case <-ctx.Done():
			p.log.Warn("graceful stop timed out: cutting calls still in flight", zap.Error(ctx.Err()))
			p.srv.Stop()
			<-done
		}
		p.serving.Wait()
		p.stopErr = p.pool.Close()
		p.log.Info("proxy stopped")
	})
	return p.stopErr
}

// streamWorkers is how many goroutines are kept to run calls: about the
// calls in flight of a busy proxy.
const streamWorkers = 64

// bidi is the descriptor for every forwarded call: the proxy cannot know a
// method's shape and does not need to; unary is a stream of one each way.
var bidi = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

// clientError marks a failure on the client side of a forwarded call; it
// is the cancel cause of the upstream call, and the status the client gets.
type clientError struct{ err error }

func (e *clientError) Error() string { return e.err.Error() }
func (e *clientError) Unwrap() error { return e.err }

// forward is the unknown-service handler: it relays one call of any method
// to the enclave through the pool.
func (p *Proxy) forward(_ any, ss grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(ss)
	if !ok {
		return status.Error(codes.Internal, "proxy: stream without a method")
	}
	// The upstream call lives in the client's context: its deadline goes
	// upstream as grpc-timeout and its cancellation cancels the upstream
	// call. The cause tells a client-side failure from an upstream one.
	ctx, cancel := context.WithCancelCause(outgoingContext(ss.Context()))
	defer cancel(nil)

	cs, err := p.pool.NewStream(ctx, bidi, method, p.callOpts...)
	if err != nil {
		if errors.Is(err, pool.ErrNoReadyConn) || errors.Is(err, pool.ErrClosed) {
			p.obs.UpstreamError(metrics.ReasonNoReadyConnection)
		} else {
			p.observeUpstream(err)
		}
		return err // already a status: Unavailable when no connection is ready
	}
	go p.clientToUpstream(method, ss, cs, cancel)
	err = p.upstreamToClient(method, cs, ss)
	var ce *clientError
	if errors.As(context.Cause(ctx), &ce) {
		return ce.err // the client's failure, not the upstream's
	}
	if err != errPanic {
		p.observeUpstream(err)
	}
	return err
}

// observeUpstream reports a forwarded call's upstream status when it is a
// failure of the hop or of the enclave, not of the caller.
func (p *Proxy) observeUpstream(err error) {
	switch status.Code(err) {
	case codes.Unavailable:
		p.obs.UpstreamError(metrics.ReasonUnavailable)
	case codes.Internal, codes.Unknown, codes.DataLoss:
		p.obs.UpstreamError(metrics.ReasonServerFault)
	}
}

// clientToUpstream copies request messages until the client half-closes
// (then half-closes upstream) or fails (then cancels the upstream call).
func (p *Proxy) clientToUpstream(method string, ss grpc.ServerStream, cs grpc.ClientStream, cancel context.CancelCauseFunc) {
	defer func() {
		if v := recover(); v != nil {
			cancel(&clientError{recovered(p.log, method, v)})
		}
	}()
	var f Frame
	defer f.Free()
	for {
		if err := ss.RecvMsg(&f); err != nil {
			if errors.Is(err, io.EOF) {
				_ = cs.CloseSend() // grpc-go's CloseSend always returns nil
				return
			}
			cancel(&clientError{err})
			return
		}
		err := cs.SendMsg(&f)
		f.Free() // no-op unless SendMsg failed before taking the buffers
		if err != nil {
			// The upstream call is over (io.EOF: the enclave answered
			// early) or broken; upstreamToClient returns its status.
			return
		}
	}
}

// upstreamToClient relays headers, response messages, then trailers, and
// returns the upstream's status (nil for OK).
func (p *Proxy) upstreamToClient(method string, cs grpc.ClientStream, ss grpc.ServerStream) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = recovered(p.log, method, v)
		}
	}()
	// Header blocks until the enclave sends headers or ends the call; nil
	// means it answered trailers-only, which the proxy then does too.
	if md, herr := cs.Header(); herr == nil && md != nil {
		if err := ss.SendHeader(filterMetadata(md)); err != nil {
			return err // client gone; the deferred cancel ends upstream
		}
	}
	var f Frame
	defer f.Free()
	for {
		if err := cs.RecvMsg(&f); err != nil {
			ss.SetTrailer(filterMetadata(cs.Trailer()))
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err // the enclave's status, details included
		}
		err := ss.SendMsg(&f)
		f.Free()
		if err != nil {
			return err
		}
	}
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
