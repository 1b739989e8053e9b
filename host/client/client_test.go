package client

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"

	"github.com/nitrosign/nitrosign/internal/callauth"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// rawCodec records each request's bytes as they arrived.
type rawCodec struct {
	base encoding.CodecV2
	raw  sync.Map
}

func (c *rawCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }
func (c *rawCodec) Name() string                           { return c.base.Name() }
func (c *rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	c.raw.Store(v, data.Materialize())
	return c.base.Unmarshal(data, v)
}

type server struct {
	pb.UnimplementedSignerServiceServer
	pb.UnimplementedEchoServiceServer
	codec *rawCodec
	mu    sync.Mutex
	// verdicts maps each method called to the caller check's result: ""
	// for an anonymous call, "ok" or the error.
	verdicts map[string]string
	caller   callauth.Caller
}

func (s *server) Sign(context.Context, *pb.SignRequest) (*pb.SignResponse, error) {
	return &pb.SignResponse{KeyId: "k"}, nil
}

func (s *server) Echo(_ context.Context, r *pb.EchoRequest) (*pb.EchoResponse, error) {
	return &pb.EchoResponse{Payload: r.GetPayload()}, nil
}

func (s *server) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	raw, _ := s.codec.raw.LoadAndDelete(req)
	md, _ := metadata.FromIncomingContext(ctx)
	verdict := ""
	if c, err := callauth.ParseMetadata(md); err == nil {
		verdict = "ok"
		if err := c.Verify(s.caller, info.FullMethod, raw.([]byte)); err != nil {
			verdict = err.Error()
		}
	} else if len(md.Get(callauth.MDCaller)) > 0 {
		verdict = err.Error()
	}
	s.mu.Lock()
	s.verdicts[info.FullMethod] = verdict
	s.mu.Unlock()
	return h(ctx, req)
}

// With Options.Identity, Sign is signed (verified by the server over the
// bytes it received) and Echo is not; without it, nothing is.
func TestDialWithIdentity(t *testing.T) {
	id, err := callauth.NewIdentity(callauth.TypeEd25519)
	if err != nil {
		t.Fatal(err)
	}
	s := &server{codec: &rawCodec{base: encoding.GetCodecV2(grpcproto.Name)}, verdicts: map[string]string{}, caller: id.Public()}
	srv := grpc.NewServer(grpc.ForceServerCodecV2(s.codec), grpc.UnaryInterceptor(s.intercept))
	pb.RegisterSignerServiceServer(srv, s)
	pb.RegisterEchoServiceServer(srv, s)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(l) }()
	defer func() { srv.Stop(); <-served }()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name     string
		identity *callauth.Identity
		sign     string
	}{
		{"with identity", id, "ok"},
		{"without identity", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// An interceptor of the caller's own, in DialOptions, runs
			// before the signing one and may change the request.
			stamp := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				if r, ok := req.(*pb.SignRequest); ok {
					r.Message = append(r.Message, "+stamped"...)
				}
				return invoker(ctx, method, req, reply, cc, opts...)
			}
			cl, err := Dial(ctx, "tcp://"+l.Addr().String(), Options{Identity: tc.identity, DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(stamp)}})
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			if _, err := cl.Signer.Sign(ctx, &pb.SignRequest{Message: []byte("m")}); err != nil {
				t.Fatal(err)
			}
			if _, err := cl.Echo.Echo(ctx, &pb.EchoRequest{Payload: []byte("e")}); err != nil {
				t.Fatal(err)
			}
			s.mu.Lock()
			defer s.mu.Unlock()
			if got := s.verdicts[pb.SignerService_Sign_FullMethodName]; got != tc.sign {
				t.Errorf("Sign: server says %q, want %q", got, tc.sign)
			}
			if got := s.verdicts[pb.EchoService_Echo_FullMethodName]; got != "" {
				t.Errorf("Echo: server says %q, want an anonymous call", got)
			}
		})
	}
}
