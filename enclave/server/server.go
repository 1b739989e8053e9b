// Package server is the enclave's gRPC edge: it serves Echo, Signer,
// Attestation, Stats (when given), grpc.health.v1 and reflection on an
// injected net.Listener, maps domain errors to precise status codes, and
// drains gracefully.
package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	// Clients may compress requests with gzip, the one compressor every
	// gRPC implementation ships; the host proxy relays them as they are.
	"google.golang.org/grpc/codes"
	_ "google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/enclave/stats"
	"github.com/nitrosign/nitrosign/internal/callauth"
	"github.com/nitrosign/nitrosign/internal/limits"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Config tunes the gRPC server. Build it from DefaultConfig; Validate
// reports every invalid field (internal/limits' convention).
type Config struct {
	// GracefulStopTimeout bounds how long in-flight calls may run after a
	// stop signal before they are cut off. Default 10s.
	GracefulStopTimeout time.Duration
	// Limits protect the enclave from load and from hostile or broken
	// peers (the host proxy's pool, or anything on the parent that dials
	// the vsock port); docs/RELIABILITY.md lists what each one answers.
	// Defaults (DefaultConfig):
	//   - MaxConnections 512: the proxy's pool holds a few (4 per proxy by
	//     default, at most 256).
	//   - MaxInFlight 1024: far above what two to four cores can sign at
	//     once, low enough to bound memory.
	//   - DefaultCallTimeout 30s; streams (health Watch) are left alone.
	//   - MaxConcurrentStreams 1024 (= MaxInFlight, so one connection can
	//     use the whole enclave and MaxInFlight, not this, is what sheds).
	//   - MaxHeaderListSize 64 KiB (grpc-go's default is 16 MiB), and
	//     MaxMetadataSize 32 KiB (the proxy forwards at most 16 KiB by
	//     default).
	//   - MaxRecvMsgSize 1 MiB: a RAW Sign takes at most 4 KiB; Echo is
	//     the only large message.
	//   - HandshakeTimeout 5s (grpc-go's own default is 120s).
	//   - KeepaliveMinTime 10s: the shortest interval a grpc-go client can
	//     ping at, so any keepalive setting of the proxy is accepted.
	//   - KeepaliveTime 5m, KeepaliveTimeout 20s.
	//   - MaxConnectionIdle, MaxConnectionAge, MaxConnectionAgeGrace 0
	//     (never): the proxy keeps long-lived connections on purpose (a
	//     reconnect is a cost the next callers pay, and a reconnected
	//     connection takes no calls until its health Watch answers), and
	//     its only peers are on the parent instance, behind the proxy's own
	//     connection limits: aging them out would buy nothing.
	Limits limits.Config
}

// Defaults of DefaultConfig.
const (
	DefaultGracefulStopTimeout  = 10 * time.Second
	DefaultMaxRecvMsgSize       = 1 << 20
	DefaultHandshakeTimeout     = 5 * time.Second
	DefaultMaxInFlight          = 1024
	DefaultCallTimeout          = 30 * time.Second
	DefaultMaxConnections       = 512
	DefaultMaxConcurrentStreams = 1024
	DefaultMaxHeaderListSize    = 64 << 10
	DefaultMaxMetadataSize      = 32 << 10
	DefaultKeepaliveMinTime     = 10 * time.Second
	DefaultKeepaliveTime        = 5 * time.Minute
	DefaultKeepaliveTimeout     = 20 * time.Second
)

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		GracefulStopTimeout: DefaultGracefulStopTimeout,
		Limits: limits.Config{
			MaxConnections:       DefaultMaxConnections,
			MaxInFlight:          DefaultMaxInFlight,
			DefaultCallTimeout:   DefaultCallTimeout,
			MaxConcurrentStreams: DefaultMaxConcurrentStreams,
			MaxHeaderListSize:    DefaultMaxHeaderListSize,
			MaxMetadataSize:      DefaultMaxMetadataSize,
			MaxRecvMsgSize:       DefaultMaxRecvMsgSize,
			HandshakeTimeout:     DefaultHandshakeTimeout,
			KeepaliveMinTime:     DefaultKeepaliveMinTime,
			KeepaliveTime:        DefaultKeepaliveTime,
			KeepaliveTimeout:     DefaultKeepaliveTimeout,
		},
	}
}

// Validate reports every invalid field, each with a precise message.
func (c Config) Validate() error {
	var errs []error
	if c.GracefulStopTimeout <= 0 {
		errs = append(errs, fmt.Errorf("graceful stop timeout %s: must be > 0", c.GracefulStopTimeout))
	}
	return errors.Join(append(errs, c.Limits.Validate())...)
}

// The HTTP/2 receive windows (see New): a stream's holds any Sign request
// and a 64 KiB Echo whole (a larger message gets more as its handler reads
// it); the connection's, four such streams at once (its credit goes back as
// bytes arrive, whether or not a handler has read them).
const (
	streamWindow = 256 << 10
	connWindow   = 1 << 20
)

// streamWorkers is how many goroutines are kept to run calls: about the
// calls in flight of a busy enclave (the host proxy's pool spreads its
// callers' calls over a few connections).
const streamWorkers = 64

// Services are the names the health service reports on, besides "" (the
// whole server).
var Services = []string{
	pb.EchoService_ServiceDesc.ServiceName,
	pb.SignerService_ServiceDesc.ServiceName,
	pb.AttestationService_ServiceDesc.ServiceName,
	pb.KeyAdminService_ServiceDesc.ServiceName,
	pb.SessionService_ServiceDesc.ServiceName,
}

// Authorizer decides whether the caller of a Sign or KeyAdminService call
// may make it (*authz.Authorizer): it authenticates the caller from the
// call's metadata and digest, the SHA-256 of the request's bytes as they
// arrived, checks the policy, and records the decision. A non-nil error is
// the status to answer with.
type Authorizer interface {
	Authorize(ctx context.Context, method string, req any, digest [32]byte) error
}

// SessionOpener opens callers' sessions (*authz.Authorizer): it answers
// SessionService.OpenSession once the Authorizer has verified the call's
// signature.
type SessionOpener interface {
	OpenSession(ctx context.Context, req *pb.OpenSessionRequest) (*pb.OpenSessionResponse, error)
}

// KeyAdmin rotates a sealed keyset (*keyset.Manager).
type KeyAdmin interface {
	CreateKey(ctx context.Context, typ pb.KeyType) (*pb.KeyInfo, error)
	SetKeyEnabled(ctx context.Context, keyID string, enabled bool) (*pb.KeyInfo, error)
}

// Params are New's dependencies.
type Params struct {
	fx.In

	Config    Config
	Logger    *zap.Logger
	Listener  net.Listener
	Signer    *signer.Signer
	Attester  Attester     `optional:"true"`
	Lifecycle fx.Lifecycle `optional:"true"`
	// KeyAdmin serves KeyAdminService; without one (ephemeral keys) it
	// answers FAILED_PRECONDITION.
	KeyAdmin KeyAdmin `optional:"true"`
	// Authorizer guards Sign and KeyAdminService. The enclave's graph
	// always has one; a server built without one (some tests) lets every
	// caller through.
	Authorizer Authorizer `optional:"true"`

	// Stats, when present, counts every call (a grpc stats handler) and
	// every signature, and is served as nitrosign.v1.StatsService (the
	// host proxy scrapes it).
	Stats *stats.Stats `optional:"true"`
}

// Server is the enclave's gRPC server.
type Server struct {
	cfg    Config
	log    *zap.Logger
	lis    net.Listener
	grpc   *grpc.Server
	health *health.Server
	signer *signer.Signer
	authz  Authorizer
	served chan struct{} // closed when Serve returns

	mu      sync.Mutex
	started bool
	serving bool
}

// Module provides *Server and starts it with the app.
var Module = fx.Module("server", fx.Provide(New), fx.Invoke(func(*Server) {}))

// New builds the server; it serves only from Start (the fx OnStart hook).
// Health is NOT_SERVING until then. The server keeps its stream workers
// (idle goroutines) from New until Stop, so a server that is built must be
// stopped, served or not.
func New(p Params) (*Server, error) {
	if err := p.Config.Validate(); err != nil {
		return nil, err
	}
	cfg := p.Config
	log := p.Logger.Named("server")
	s := &Server{
		cfg:    cfg,
		log:    log,
		lis:    limitListener(p.Listener, cfg, log),
		health: health.NewServer(),
		signer: p.Signer,
		authz:  p.Authorizer,
		served: make(chan struct{}),
	}
	// Calls are counted by a stats handler (below), outside every
	// interceptor: it sees the code each call was answered with, whatever
	// turned it into that (a panic, a malformed request, a limit), and the
	// calls grpc-go answers before any interceptor runs.
	unary := []grpc.UnaryServerInterceptor{unaryLogging(log), s.unaryNotReady}
	stream := []grpc.StreamServerInterceptor{streamLogging(log)}
	// A unary request is decoded before any interceptor runs: the
	// malformed check comes before the limits, which may refuse the call,
	// so that every call takes its entry out of the codec's table.
	unary = append(unary, unaryMalformed)
	// Limits inside logging, so a shed call is logged as the
	// ResourceExhausted it was answered with.
	lu, ls := limitInterceptors(cfg, log)
	unary = append(unary, lu...)
	// Callers are authenticated and authorised inside the limits, so a
	// flood of calls is shed before any signature is checked, and inside
	// the recovery, so a panic in the check is one call's Internal error.
	stream = append(stream, ls...)
	unary = append(unary, unaryRecovery(log), s.unaryAuth)
	stream = append(stream, streamRecovery(log), streamMalformed)
	opts := cfg.Limits.ServerOptions()
	if p.Stats != nil {
		// The registered methods are read at the first call, after every
		// service below (and any a test adds through GRPC) is registered.
		opts = append(opts, grpc.StatsHandler(p.Stats.Handler(func() map[string]grpc.ServiceInfo { return s.grpc.GetServiceInfo() })))
	}
	s.grpc = grpc.NewServer(append(opts,
		grpc.ForceServerCodecV2(newRequestCodec()),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
		// Calls run on long-lived worker goroutines, not a new goroutine
		// each: a Sign call's stack (crypto included) outgrows a fresh
		// goroutine's, and growing it by copying was ~15% of the enclave's
		// CPU under signing load (docs/PERFORMANCE.md). Calls beyond the
		// workers still get a goroutine of their own. Stop ends them.
		grpc.NumStreamWorkers(streamWorkers),
		// Fixed receive windows, no BDP estimation: grpc-go's estimator
		// pings the peer at every burst of request data, which at one call
		// in flight is a PING and its acknowledgement per call, on both
		// sides of the vsock hop; its windows would also grow, up to 16 MiB
		// a stream, at a peer's will. With fixed windows, what a peer can
		// make the enclave hold unread is a stream window per open stream.
		grpc.StaticStreamWindowSize(streamWindow),
		grpc.StaticConnWindowSize(connWindow),
	)...)
	pb.RegisterEchoServiceServer(s.grpc, &echoService{})
	pb.RegisterSignerServiceServer(s.grpc, &signerService{signer: p.Signer, log: log, stats: p.Stats})
	pb.RegisterAttestationServiceServer(s.grpc, &attestationService{attester: p.Attester, log: log})
	pb.RegisterKeyAdminServiceServer(s.grpc, &keyAdminService{admin: p.KeyAdmin, log: log})
	sessions := &sessionService{}
	if o, ok := p.Authorizer.(SessionOpener); ok {
		sessions.opener = o
	}
	pb.RegisterSessionServiceServer(s.grpc, sessions)
	if p.Stats != nil {
		pb.RegisterStatsServiceServer(s.grpc, stats.NewService(p.Stats))
	}
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)
	s.setServing(healthpb.HealthCheckResponse_NOT_SERVING)

	if p.Lifecycle != nil {
		p.Lifecycle.Append(fx.Hook{OnStart: s.Start, OnStop: s.Stop})
	}
	return s, nil
}

// GRPC exposes the underlying server, e.g. to register test services.
func (s *Server) GRPC() *grpc.Server { return s.grpc }

func (s *Server) setServing(st healthpb.HealthCheckResponse_ServingStatus) {
	s.health.SetServingStatus("", st)
	for _, name := range Services {
		s.health.SetServingStatus(name, st)
	}
}

// Start serves in the background and reports SERVING when the signer has
// its keys: ephemeral keys were made and self-tested before the server
// was constructed; a sealed keyset reports through KeysChanged once it is
// unsealed. Until then health is NOT_SERVING and says why.
func (s *Server) Start(context.Context) error {
	go func() {
		defer close(s.served)
		if err := s.grpc.Serve(s.lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) && !errors.Is(err, net.ErrClosed) {
			s.log.Error("serve ended", zap.Error(err))
		}
	}()
	s.mu.Lock()
	s.started = true
	s.mu.Unlock()
	s.KeysChanged()
	s.log.Info("listening", zap.String("addr", s.lis.Addr().String()))
	return nil
}

// KeysChanged sets health from the signer: SERVING once it has keys,
// NOT_SERVING (with the reason on Health/Check's trailer) while it has
// none.
func (s *Server) KeysChanged() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.started {
		return
	}
	ready := s.signer.NotReady() == ""
	if ready == s.serving {
		return
	}
	s.serving = ready
	if ready {
		s.setServing(healthpb.HealthCheckResponse_SERVING)
		s.log.Info("serving", zap.String("addr", s.lis.Addr().String()))
		return
	}
	s.setServing(healthpb.HealthCheckResponse_NOT_SERVING)
	s.log.Warn("not serving: the signer has no keys", zap.String("reason", s.signer.NotReady()))
}

// unaryAuth has the Authorizer decide every Sign and KeyAdminService call.
func (s *Server) unaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	digest, ok := digestFrom(ctx)
	if !callauth.DefaultMethods(info.FullMethod) {
		return handler(ctx, req)
	}
	if !ok {
		// Every such request is decoded by requestCodec, which records it.
		s.log.Error("no request digest for a call callers must sign", zap.String("method", info.FullMethod))
		return nil, status.Error(codes.Internal, "internal error")
	}
	if s.authz != nil {
		if err := s.authz.Authorize(ctx, info.FullMethod, req, digest); err != nil {
			return nil, err
		}
	}
	return handler(ctx, req)
}

// NotReadyTrailer is the trailer on a grpc.health.v1.Health/Check answer
// that says why the enclave is NOT_SERVING (grpcurl -v shows it):
// the sealed keyset not unsealed yet, and why.
const NotReadyTrailer = "nitrosign-not-ready"

// unaryNotReady adds NotReadyTrailer to health checks while the signer
// has no keys.
func (s *Server) unaryNotReady(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if info.FullMethod == healthpb.Health_Check_FullMethodName {
		if reason := s.signer.NotReady(); reason != "" {
			_ = grpc.SetTrailer(ctx, metadata.Pairs(NotReadyTrailer, reason))
		}
	}
	return handler(ctx, req)
}

// Stop drains: NOT_SERVING first (so the proxy stops routing new calls
// here), then GracefulStop bounded by the configured timeout and by ctx,
// then a hard Stop for whatever is left.
func (s *Server) Stop(ctx context.Context) error {
	s.mu.Lock()
	s.started = false // KeysChanged leaves health alone from here
	s.mu.Unlock()
	s.health.Shutdown()
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	timer := time.NewTimer(s.cfg.GracefulStopTimeout)
	defer timer.Stop()
	select {
	case <-done:
		s.log.Info("drained")
	case <-timer.C:
		s.log.Warn("graceful stop timed out; cutting remaining calls", zap.Duration("timeout", s.cfg.GracefulStopTimeout))
		s.grpc.Stop()
	case <-ctx.Done():
		s.log.Warn("stop deadline reached; cutting remaining calls")
		s.grpc.Stop()
	}
	<-done
	return nil
}
