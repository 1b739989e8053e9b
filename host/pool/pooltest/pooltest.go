// Package pooltest runs a real upstream gRPC server on a TCP loopback
// listener for the pool and proxy tests: nitrosign EchoService and
// SignerService stubs, the grpc interop TestService (streaming RPCs),
// grpc.health.v1 and reflection. Stubs are function-field stubs in the
// manner of grpc-go's internal/stubserver: an unset field gets a sensible
// default behaviour. Fields are Handler values, safe to swap while calls run.
package pooltest

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	// Clients may compress requests with gzip, the one compressor every
	// gRPC implementation ships; the host proxy relays them as they are.
	"google.golang.org/grpc/codes"
	_ "google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/internal/target"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Handler is a stub's function field that a test may set, or swap, while
// calls are running (a plain field would be a data race under -race).
type Handler[F any] struct {
	mu sync.RWMutex
	f  F
	ok bool
}

// Set installs f.
func (h *Handler[F]) Set(f F) {
	h.mu.Lock()
	h.f, h.ok = f, true
	h.mu.Unlock()
}

// Reset goes back to the default behaviour.
func (h *Handler[F]) Reset() {
	h.mu.Lock()
	var zero F
	h.f, h.ok = zero, false
	h.mu.Unlock()
}

// Get returns the installed function, if any.
func (h *Handler[F]) Get() (F, bool) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.f, h.ok
}

// EchoStub implements nitrosignv1.EchoServiceServer with a function field.
type EchoStub struct {
	nitrosignv1.UnimplementedEchoServiceServer
	// EchoF handles Echo; unset echoes the payload.
	EchoF Handler[func(context.Context, *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error)]
}

// Echo calls EchoF or echoes the payload.
func (s *EchoStub) Echo(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
	if f, ok := s.EchoF.Get(); ok {
		return f(ctx, req)
	}
	return &nitrosignv1.EchoResponse{Payload: req.GetPayload(), ReceiveTime: timestamppb.Now()}, nil
}

// SignerStub implements nitrosignv1.SignerServiceServer with function
// fields; unset fields answer Unimplemented.
type SignerStub struct {
	nitrosignv1.UnimplementedSignerServiceServer
	SignF         Handler[func(context.Context, *nitrosignv1.SignRequest) (*nitrosignv1.SignResponse, error)]
	GetPublicKeyF Handler[func(context.Context, *nitrosignv1.GetPublicKeyRequest) (*nitrosignv1.GetPublicKeyResponse, error)]
	ListKeysF     Handler[func(context.Context, *nitrosignv1.ListKeysRequest) (*nitrosignv1.ListKeysResponse, error)]
}

// Sign calls SignF.
func (s *SignerStub) Sign(ctx context.Context, req *nitrosignv1.SignRequest) (*nitrosignv1.SignResponse, error) {
	if f, ok := s.SignF.Get(); ok {
		return f(ctx, req)
	}
	return s.UnimplementedSignerServiceServer.Sign(ctx, req)
}

// GetPublicKey calls GetPublicKeyF.
func (s *SignerStub) GetPublicKey(ctx context.Context, req *nitrosignv1.GetPublicKeyRequest) (*nitrosignv1.GetPublicKeyResponse, error) {
	if f, ok := s.GetPublicKeyF.Get(); ok {
		return f(ctx, req)
	}
	return s.UnimplementedSignerServiceServer.GetPublicKey(ctx, req)
}

// ListKeys calls ListKeysF.
func (s *SignerStub) ListKeys(ctx context.Context, req *nitrosignv1.ListKeysRequest) (*nitrosignv1.ListKeysResponse, error) {
	if f, ok := s.ListKeysF.Get(); ok {
		return f(ctx, req)
	}
	return s.UnimplementedSignerServiceServer.ListKeys(ctx, req)
}

// TestStub implements the grpc interop TestService with function fields; an
// unset field gets the interop semantics (see each method).
type TestStub struct {
	testpb.UnimplementedTestServiceServer
	UnaryCallF           Handler[func(context.Context, *testpb.SimpleRequest) (*testpb.SimpleResponse, error)]
	StreamingOutputCallF Handler[func(*testpb.StreamingOutputCallRequest, testpb.TestService_StreamingOutputCallServer) error]
	StreamingInputCallF  Handler[func(testpb.TestService_StreamingInputCallServer) error]
	FullDuplexCallF      Handler[func(testpb.TestService_FullDuplexCallServer) error]
}

// EmptyCall answers an empty message.
func (s *TestStub) EmptyCall(context.Context, *testpb.Empty) (*testpb.Empty, error) {
	return &testpb.Empty{}, nil
}

// UnaryCall calls UnaryCallF, or returns ResponseSize zero bytes, or the
// requested ResponseStatus.
func (s *TestStub) UnaryCall(ctx context.Context, req *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	if f, ok := s.UnaryCallF.Get(); ok {
		return f(ctx, req)
	}
	if st := req.GetResponseStatus(); st != nil && st.GetCode() != 0 {
		return nil, status.Error(codesOf(st.GetCode()), st.GetMessage())
	}
	return &testpb.SimpleResponse{Payload: &testpb.Payload{Body: make([]byte, req.GetResponseSize())}}, nil
}

// StreamingOutputCall calls StreamingOutputCallF, or sends one response per
// ResponseParameters, each with Size bytes of payload whose first byte is its
// index.
func (s *TestStub) StreamingOutputCall(req *testpb.StreamingOutputCallRequest, stream testpb.TestService_StreamingOutputCallServer) error {
	if f, ok := s.StreamingOutputCallF.Get(); ok {
		return f(req, stream)
	}
	return sendResponses(req, stream)
}

// StreamingInputCall calls StreamingInputCallF, or sums payload sizes until
// the client half-closes.
func (s *TestStub) StreamingInputCall(stream testpb.TestService_StreamingInputCallServer) error {
	if f, ok := s.StreamingInputCallF.Get(); ok {
		return f(stream)
	}
	var sum int32
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&testpb.StreamingInputCallResponse{AggregatedPayloadSize: sum})
		}
		if err != nil {
			return err
		}
		sum += int32(len(req.GetPayload().GetBody()))
	}
}

// FullDuplexCall calls FullDuplexCallF, or answers each request as soon as
// it arrives, as StreamingOutputCall does.
func (s *TestStub) FullDuplexCall(stream testpb.TestService_FullDuplexCallServer) error {
	if f, ok := s.FullDuplexCallF.Get(); ok {
		return f(stream)
	}
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := sendResponses(req, stream); err != nil {
			return err
		}
	}
}

// HalfDuplexCall buffers every request until the client half-closes, then
// answers them in order.
func (s *TestStub) HalfDuplexCall(stream testpb.TestService_HalfDuplexCallServer) error {
	var reqs []*testpb.StreamingOutputCallRequest
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		reqs = append(reqs, req)
	}
	for _, req := range reqs {
		if err := sendResponses(req, stream); err != nil {
			return err
		}
	}
	return nil
}

func sendResponses(req *testpb.StreamingOutputCallRequest, stream interface {
	Send(*testpb.StreamingOutputCallResponse) error
}) error {
	if st := req.GetResponseStatus(); st != nil && st.GetCode() != 0 {
		return status.Error(codesOf(st.GetCode()), st.GetMessage())
	}
	for i, p := range req.GetResponseParameters() {
		body := make([]byte, p.GetSize())
		if len(body) > 0 {
			body[0] = byte(i)
		}
		if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: &testpb.Payload{Body: body}}); err != nil {
			return err
		}
	}
	return nil
}

// Upstream is a running upstream server. Stop and Restart simulate an
// enclave going away and coming back on the same address.
type Upstream struct {
	Echo   *EchoStub
	Signer *SignerStub
	Test   *TestStub
	// Health is shared by every incarnation of the server; set statuses on
	// it to play an enclave that is starting or draining.
	Health *health.Server

	t    testing.TB
	addr string
	opts []grpc.ServerOption

	mu    sync.Mutex
	srv   *grpc.Server
	done  chan struct{}
	peers map[string]int // remote address -> calls, health checks excluded
}

// Start serves on 127.0.0.1:0 and stops the server in t.Cleanup. opts are
// added to the server's options.
func Start(t testing.TB, opts ...grpc.ServerOption) *Upstream {
	t.Helper()
	u := &Upstream{
		Echo:   &EchoStub{},
		Signer: &SignerStub{},
		Test:   &TestStub{},
		Health: health.NewServer(),
		t:      t,
		opts:   opts,
		peers:  map[string]int{},
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("upstream listen: %v", err)
	}
	u.addr = l.Addr().String()
	u.serve(l)
	t.Cleanup(u.Stop)
	return u
}

// Target is the upstream's address for pool.New.
func (u *Upstream) Target() target.Target {
	return target.Target{Scheme: target.TCP, HostPort: u.addr}
}

// Addr is the upstream's host:port.
func (u *Upstream) Addr() string { return u.addr }

func (u *Upstream) serve(l net.Listener) {
	opts := append([]grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			u.recordPeer(ctx, info.FullMethod)
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			u.recordPeer(ss.Context(), info.FullMethod)
			return h(srv, ss)
		}),
	}, u.opts...)
	srv := grpc.NewServer(opts...)
	nitrosignv1.RegisterEchoServiceServer(srv, u.Echo)
	nitrosignv1.RegisterSignerServiceServer(srv, u.Signer)
	testpb.RegisterTestServiceServer(srv, u.Test)
	healthpb.RegisterHealthServer(srv, u.Health)
	reflection.Register(srv)
	done := make(chan struct{})
	u.mu.Lock()
	u.srv, u.done = srv, done
	u.mu.Unlock()
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
}

func (u *Upstream) recordPeer(ctx context.Context, method string) {
	if method == healthpb.Health_Watch_FullMethodName {
		return
	}
	p, ok := peer.FromContext(ctx)
	if !ok {
		return
	}
	u.mu.Lock()
	u.peers[p.Addr.String()]++
	u.mu.Unlock()
}

// Peers returns the number of calls per client connection (remote address)
// since the last ResetPeers, health-check streams excluded.
func (u *Upstream) Peers() map[string]int {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make(map[string]int, len(u.peers))
	for k, v := range u.peers {
		out[k] = v
	}
	return out
}

// ResetPeers forgets the recorded peers.
func (u *Upstream) ResetPeers() {
	u.mu.Lock()
	u.peers = map[string]int{}
	u.mu.Unlock()
}

// Stop stops the server at once (connections are closed, as when an
// enclave dies) and waits for Serve to return. Stopping twice is fine.
func (u *Upstream) Stop() {
	u.mu.Lock()
	srv, done := u.srv, u.done
	u.mu.Unlock()
	if srv == nil {
		return
	}
	srv.Stop()
	<-done
}

// Restart serves again on the same address after Stop.
func (u *Upstream) Restart() {
	u.t.Helper()
	u.Stop()
	var (
		l   net.Listener
		err error
	)
	// The port was just released; another process could in theory take it,
	// but on loopback in a test this retry is for the kernel only.
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err = net.Listen("tcp", u.addr)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		u.t.Fatalf("upstream relisten on %s: %v", u.addr, err)
	}
	u.serve(l)
}

func codesOf(c int32) codes.Code { return codes.Code(uint32(c)) }
