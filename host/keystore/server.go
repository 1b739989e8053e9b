package keystore

import (
	"context"
	"errors"
	"net"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/internal/keysetfmt"
	"github.com/nitrosign/nitrosign/internal/limits"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Defaults of Config and the server's fixed bounds.
const (
	DefaultMaxConns         = 16
	DefaultHandshakeTimeout = 10 * time.Second
	// MaxMsgSize bounds a message either way: a sealed keyset and room
	// for the rest of the message.
	MaxMsgSize = keysetfmt.MaxSize + 64<<10
	// maxStreams bounds the calls open at once on one connection: an
	// enclave makes one call at a time.
	maxStreams = 8
	// callTimeout is the deadline of a call that came without one.
	callTimeout    = 30 * time.Second
	maxHeaderList  = 16 << 10
	maxMetadata    = 8 << 10
	keepaliveMin   = 10 * time.Second
	keepaliveTime  = 2 * time.Minute
	keepaliveAck   = 20 * time.Second
	connectionIdle = 15 * time.Minute
)

// Config is the HostService's place and bounds.
type Config struct {
	// Port is the vsock port (any CID) enclaves reach HostService on
	// (their --keyset-host, vsock://3:5051 by default). 0: Module does
	// nothing. The proxy's --enclave-host-port; the unit sets 5051.
	Port uint32
	// Path is the sealed keyset file. Default DefaultPath.
	Path string
	// MaxConns bounds the connections open at once; one more is closed at
	// once (logged once a second at most). Default 16.
	MaxConns int
	// HandshakeTimeout bounds how long a new connection may take to send
	// the HTTP/2 preface and settings. Default 10s.
	HandshakeTimeout time.Duration
}

func (c Config) withDefaults() Config {
	if c.Path == "" {
		c.Path = DefaultPath
	}
	if c.MaxConns <= 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	return c
}

// Server serves HostService: the store's keyset and the credentials.
type Server struct {
	cfg   Config
	log   *zap.Logger
	store *Store
	creds *Credentials
	grpc  *grpc.Server
	// credFail throttles the log of credential failures (an enclave
	// without credentials retries with backoff).
	credFail *limits.Throttle
	refused  *limits.Throttle
}

var _ pb.HostServiceServer = (*service)(nil)

// NewServer returns a server of store and creds; it serves only from Serve.
func NewServer(cfg Config, store *Store, creds *Credentials, log *zap.Logger) *Server {
	cfg = cfg.withDefaults()
	log = log.Named("hostservice")
	s := &Server{cfg: cfg, log: log, store: store, creds: creds,
		credFail: limits.NewThrottle(10 * time.Second), refused: limits.NewThrottle(time.Second)}
	lim := limits.Config{
		MaxConcurrentStreams: maxStreams,
		MaxHeaderListSize:    maxHeaderList,
		MaxRecvMsgSize:       MaxMsgSize,
		HandshakeTimeout:     cfg.HandshakeTimeout,
		KeepaliveMinTime:     keepaliveMin,
		KeepaliveTime:        keepaliveTime,
		KeepaliveTimeout:     keepaliveAck,
		MaxConnectionIdle:    connectionIdle,
	}
	s.grpc = grpc.NewServer(append(lim.ServerOptions(),
		grpc.MaxSendMsgSize(MaxMsgSize),
		grpc.ChainUnaryInterceptor(s.logCalls, limits.MetadataUnary(maxMetadata), limits.DefaultDeadline(callTimeout)),
	)...)
	pb.RegisterHostServiceServer(s.grpc, &service{s: s})
	return s
}

// Serve serves on l, at most Config.MaxConns connections at once, until l
// is closed or Stop (then nil).
func (s *Server) Serve(l net.Listener) error {
	ll := limits.NewListener(l, s.cfg.MaxConns, func(open int64) {
		if ok, more := s.refused.Allow(); ok {
			s.log.Warn("host service connection refused: too many open", zap.Int64("open", open),
				zap.Int("limit", s.cfg.MaxConns), zap.Uint64("refused_since_last_line", more+1))
		}
	})
	err := s.grpc.Serve(ll)
	if errors.Is(err, grpc.ErrServerStopped) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Stop lets calls in flight finish until ctx ends, then cuts them. It
// closes the listeners: Serve returns.
func (s *Server) Stop(ctx context.Context) {
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.grpc.Stop()
		<-done
	}
}

// logCalls logs every call at debug level, a failed one at warn: method,
// peer, code and the status message (the service's own words: paths,
// hashes, never a keyset byte or a credential).
func (s *Server) logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	st := status.Convert(err)
	fields := append(peerFields(ctx), zap.String("method", info.FullMethod), zap.String("code", st.Code().String()),
		zap.Duration("duration", time.Since(start)))
	if err != nil {
		s.log.Warn("host service call failed", append(fields, zap.String("error", st.Message()))...)
	} else {
		s.log.Debug("host service call", fields...)
	}
	return resp, err
}

func peerFields(ctx context.Context) []zap.Field {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return nil
	}
	if a, ok := p.Addr.(*vsock.Addr); ok {
		return []zap.Field{zap.Uint32("enclave_cid", a.ContextID)}
	}
	return []zap.Field{zap.String("enclave_peer", p.Addr.String())}
}

// service is the HostService on a Server.
type service struct {
	pb.UnimplementedHostServiceServer
	s *Server
}

func (v *service) GetSealedKeyset(context.Context, *pb.GetSealedKeysetRequest) (*pb.GetSealedKeysetResponse, error) {
	got, err := v.s.store.Get()
	if err != nil {
		return nil, statusOf(err)
	}
	return &pb.GetSealedKeysetResponse{Sealed: got.Sealed, InitRequested: got.InitRequested, Location: got.Location}, nil
}

func (v *service) PutSealedKeyset(_ context.Context, req *pb.PutSealedKeysetRequest) (*pb.PutSealedKeysetResponse, error) {
	res, err := v.s.store.Put(req.GetSealed(), req.GetReplacesSha256())
	if err != nil {
		return nil, statusOf(err)
	}
	return &pb.PutSealedKeysetResponse{Location: res.Location, PreviousLocation: res.PreviousLocation}, nil
}

func (v *service) GetCredentials(ctx context.Context, _ *pb.GetCredentialsRequest) (*pb.GetCredentialsResponse, error) {
	if v.s.creds == nil {
		return nil, status.Error(codes.Unavailable, "this host hands out no AWS credentials")
	}
	c, err := v.s.creds.Retrieve(ctx)
	if err != nil {
		var ce *CredentialsError
		if errors.As(err, &ce) {
			if ok, more := v.s.credFail.Allow(); ok {
				v.s.log.Warn("no AWS credentials for the enclave", zap.String("looked_in", v.s.creds.Where()),
					zap.String("cause", ce.Cause().Error()), zap.Uint64("failures_since_last_line", more))
			}
		}
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	resp := &pb.GetCredentialsResponse{AccessKeyId: c.AccessKeyID, SecretAccessKey: c.SecretAccessKey, SessionToken: c.SessionToken}
	if c.CanExpire {
		resp.Expiration = timestamppb.New(c.Expires)
	}
	return resp, nil
}

// statusOf maps the store's errors to a status, once, at the edge.
func statusOf(err error) error {
	code := codes.Unavailable // I/O on the host: the enclave retries
	switch {
	case errors.Is(err, ErrInvalid):
		code = codes.InvalidArgument
	case errors.Is(err, ErrChanged):
		code = codes.Aborted
	case errors.Is(err, ErrNoInit), errors.Is(err, ErrTooLarge), errors.Is(err, ErrEmpty):
		code = codes.FailedPrecondition
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		code = codes.ResourceExhausted
	}
	return status.Error(code, err.Error())
}
