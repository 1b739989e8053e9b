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
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/enclave/stats"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Config tunes the gRPC server.
type Config struct {
	// GracefulStopTimeout bounds how long in-flight calls may run after a
	// stop signal before they are cut off. Default 10s.
	GracefulStopTimeout time.Duration
	// MaxRecvMsgSize is the largest request accepted, in bytes; larger ones
	// get ResourceExhausted. Default 1 MiB (a RAW Sign takes at most 4 KiB;
	// Echo is the only large message).
	MaxRecvMsgSize int
	// HandshakeTimeout bounds how long a new connection may take to send
	// the HTTP/2 preface and settings; a peer that connects and stalls is
	// dropped after it. Default 5s (grpc-go's own default is 120s).
	HandshakeTimeout time.Duration
}

// Defaults for Config's zero fields.
const (
	DefaultGracefulStopTimeout = 10 * time.Second
	DefaultMaxRecvMsgSize      = 1 << 20
	DefaultHandshakeTimeout    = 5 * time.Second
)

// Validate reports a precise error for an unusable value.
func (c Config) Validate() error {
	if c.GracefulStopTimeout < 0 {
		return fmt.Errorf("graceful stop timeout %s is negative", c.GracefulStopTimeout)
	}
	if c.HandshakeTimeout < 0 {
		return fmt.Errorf("handshake timeout %s is negative", c.HandshakeTimeout)
	}
	if c.MaxRecvMsgSize < 0 || c.MaxRecvMsgSize > 64<<20 {
		return fmt.Errorf("max receive message size %d: want 0 (default 1 MiB) to 64 MiB", c.MaxRecvMsgSize)
	}
	return nil
}

func (c Config) withDefaults() Config {
	if c.GracefulStopTimeout == 0 {
		c.GracefulStopTimeout = DefaultGracefulStopTimeout
	}
	if c.MaxRecvMsgSize == 0 {
		c.MaxRecvMsgSize = DefaultMaxRecvMsgSize
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	return c
}

// Services are the names the health service reports on, besides "" (the
// whole server).
var Services = []string{
	pb.EchoService_ServiceDesc.ServiceName,
	pb.SignerService_ServiceDesc.ServiceName,
	pb.AttestationService_ServiceDesc.ServiceName,
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

	// Stats, when present, counts every call and is served as
	// nitrosign.v1.StatsService (the host proxy scrapes it).
	Stats *stats.Stats `optional:"true"`
}

// Server is the enclave's gRPC server.
type Server struct {
	cfg    Config
	log    *zap.Logger
	lis    net.Listener
	grpc   *grpc.Server
	health *health.Server
	served chan struct{} // closed when Serve returns
}

// Module provides *Server and starts it with the app.
var Module = fx.Module("server", fx.Provide(New), fx.Invoke(func(*Server) {}))

// New builds the server; it serves only from Start (the fx OnStart hook).
// Health is NOT_SERVING until then.
func New(p Params) (*Server, error) {
	if err := p.Config.Validate(); err != nil {
		return nil, err
	}
	cfg := p.Config.withDefaults()
	log := p.Logger.Named("server")
	s := &Server{
		cfg:    cfg,
		log:    log,
		lis:    p.Listener,
		health: health.NewServer(),
		served: make(chan struct{}),
	}
	// Stats sit inside logging and outside recovery, so they count the
	// code a panic or a malformed request turned into.
	unary := []grpc.UnaryServerInterceptor{unaryLogging(log)}
	stream := []grpc.StreamServerInterceptor{streamLogging(log)}
	if p.Stats != nil {
		unary = append(unary, p.Stats.UnaryInterceptor())
		stream = append(stream, p.Stats.StreamInterceptor())
	}
	unary = append(unary, unaryRecovery(log), unaryMalformed)
	stream = append(stream, streamRecovery(log), streamMalformed)
	s.grpc = grpc.NewServer(
		grpc.MaxRecvMsgSize(cfg.MaxRecvMsgSize),
		grpc.ConnectionTimeout(cfg.HandshakeTimeout),
		grpc.ForceServerCodecV2(newRequestCodec()),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
	)
	pb.RegisterEchoServiceServer(s.grpc, &echoService{})
	pb.RegisterSignerServiceServer(s.grpc, &signerService{signer: p.Signer, log: log})
	pb.RegisterAttestationServiceServer(s.grpc, &attestationService{attester: p.Attester, log: log})
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

// Start serves in the background and reports SERVING: the keys were made
// and self-tested before the server was constructed.
func (s *Server) Start(context.Context) error {
	go func() {
		defer close(s.served)
		if err := s.grpc.Serve(s.lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) && !errors.Is(err, net.ErrClosed) {
			s.log.Error("serve ended", zap.Error(err))
		}
	}()
	s.setServing(healthpb.HealthCheckResponse_SERVING)
	s.log.Info("serving", zap.String("addr", s.lis.Addr().String()))
	return nil
}

// Stop drains: NOT_SERVING first (so the proxy stops routing new calls
// here), then GracefulStop bounded by the configured timeout and by ctx,
// then a hard Stop for whatever is left.
func (s *Server) Stop(ctx context.Context) error {
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
