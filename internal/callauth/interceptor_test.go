package callauth

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/gzip"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// rawCodec is the server's codec: gRPC's proto codec, recording the bytes
// of every request message exactly as they arrived, for the request value
// they were decoded into.
type rawCodec struct {
	base encoding.CodecV2
	raw  sync.Map // request value -> []byte
}

func (c *rawCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }
func (c *rawCodec) Name() string                           { return c.base.Name() }
func (c *rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	c.raw.Store(v, data.Materialize())
	return c.base.Unmarshal(data, v)
}

// seenCall is what the test server saw of one call.
type seenCall struct {
	method string
	md     metadata.MD
	raw    []byte
	req    proto.Message
	// verr is the server's verdict: ParseMetadata, then Verify over the
	// bytes received with the caller's key, then the replay cache.
	verr error
}

type testServer struct {
	pb.UnimplementedSignerServiceServer
	pb.UnimplementedKeyAdminServiceServer
	pb.UnimplementedEchoServiceServer

	codec   *rawCodec
	callers map[string]Caller
	replay  *ReplayCache

	mu   sync.Mutex
	seen []seenCall
}

func (s *testServer) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	raw, _ := s.codec.raw.LoadAndDelete(req)
	md, _ := metadata.FromIncomingContext(ctx)
	sc := seenCall{method: info.FullMethod, md: md, raw: raw.([]byte), req: req.(proto.Message)}
	c, err := ParseMetadata(md)
	if err == nil {
		pub, ok := s.callers[c.Caller()]
		if !ok {
			err = errors.New("unknown caller")
		} else if err = c.Verify(pub, info.FullMethod, sc.raw); err == nil {
			err = s.replay.Check(c, time.Now())
		}
	}
	sc.verr = err
	s.mu.Lock()
	s.seen = append(s.seen, sc)
	s.mu.Unlock()
	return h(ctx, req)
}

func (s *testServer) last(t *testing.T) seenCall {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.seen) == 0 {
		t.Fatal("the server saw no call")
	}
	return s.seen[len(s.seen)-1]
}

func (s *testServer) Sign(_ context.Context, r *pb.SignRequest) (*pb.SignResponse, error) {
	sum := sha256.Sum256(r.GetMessage())
	return &pb.SignResponse{KeyId: "k", Signature: sum[:]}, nil
}

func (s *testServer) ListKeys(context.Context, *pb.ListKeysRequest) (*pb.ListKeysResponse, error) {
	return &pb.ListKeysResponse{Keys: []*pb.KeyInfo{{KeyId: "k"}}}, nil
}

func (s *testServer) CreateKey(_ context.Context, r *pb.CreateKeyRequest) (*pb.CreateKeyResponse, error) {
	return &pb.CreateKeyResponse{Key: &pb.KeyInfo{KeyId: "new", KeyType: r.GetKeyType()}}, nil
}

func (s *testServer) Echo(_ context.Context, r *pb.EchoRequest) (*pb.EchoResponse, error) {
	return &pb.EchoResponse{Payload: r.GetPayload()}, nil
}

// startServer serves the test services on loopback TCP and returns a
// client connection with the given interceptors, in order.
func startServer(t *testing.T, callers []*Identity, interceptors ...grpc.UnaryClientInterceptor) (*testServer, *grpc.ClientConn) {
	t.Helper()
	s := &testServer{codec: &rawCodec{base: encoding.GetCodecV2(grpcproto.Name)}, callers: map[string]Caller{}}
	for _, id := range callers {
		s.callers[id.KeyID()] = id.Public()
	}
	s.replay = newCache(t, time.Minute, 1024)
	srv := grpc.NewServer(grpc.ForceServerCodecV2(s.codec), grpc.UnaryInterceptor(s.intercept))
	pb.RegisterSignerServiceServer(srv, s)
	pb.RegisterKeyAdminServiceServer(srv, s)
	pb.RegisterEchoServiceServer(srv, s)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(l) }()
	cc, err := grpc.NewClient("passthrough:///"+l.Addr().String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(interceptors...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cc.Close()
		srv.Stop()
		<-served
	})
	return s, cc
}

func callCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func hasCallMetadata(md metadata.MD) bool {
	for k := range md {
		if strings.HasPrefix(k, "nitrosign-") {
			return true
		}
	}
	return false
}

// The server verifies, over the very bytes it received, the signature of
// every call the interceptor signs, for both key types; other calls pass
// untouched.
func TestInterceptorAgainstAServer(t *testing.T) {
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			id := newID(t, kind)
			s, cc := startServer(t, []*Identity{id}, UnaryClientInterceptor(id, nil))
			ctx := callCtx(t)
			signer, admin, echo := pb.NewSignerServiceClient(cc), pb.NewKeyAdminServiceClient(cc), pb.NewEchoServiceClient(cc)

			req := &pb.SignRequest{
				Key:         &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}},
				Message:     []byte("a message"),
				MessageType: pb.MessageType_MESSAGE_TYPE_RAW,
			}
			resp, err := signer.Sign(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			want := sha256.Sum256([]byte("a message"))
			if !bytes.Equal(resp.GetSignature(), want[:]) || resp.GetKeyId() != "k" {
				t.Fatalf("response decoded wrong: %v", resp)
			}
			sc := s.last(t)
			if sc.verr != nil {
				t.Fatalf("server refused the signed Sign: %v", sc.verr)
			}
			if sc.md.Get("content-type")[0] != "application/grpc+proto" {
				t.Fatalf("content type %q", sc.md.Get("content-type"))
			}
			det, _ := proto.MarshalOptions{Deterministic: true}.Marshal(req)
			if !bytes.Equal(sc.raw, det) || !proto.Equal(sc.req, req) {
				t.Fatal("the server received other bytes than the deterministic encoding")
			}

			// The same request again: a new nonce, accepted.
			if _, err := signer.Sign(ctx, req); err != nil {
				t.Fatal(err)
			}
			if sc2 := s.last(t); sc2.verr != nil || sc2.md[MDNonce][0] == sc.md[MDNonce][0] {
				t.Fatalf("second call: %v, nonce reused: %v", sc2.verr, sc2.md[MDNonce][0] == sc.md[MDNonce][0])
			}

			if r, err := admin.CreateKey(ctx, &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_ED25519}); err != nil || r.GetKey().GetKeyId() != "new" {
				t.Fatalf("CreateKey: %v %v", r, err)
			}
			if sc := s.last(t); sc.method != "/nitrosign.v1.KeyAdminService/CreateKey" || sc.verr != nil {
				t.Fatalf("CreateKey not signed: %s %v", sc.method, sc.verr)
			}

			// Unsigned methods: no entry, the default content type.
			if r, err := echo.Echo(ctx, &pb.EchoRequest{Payload: []byte("x")}); err != nil || string(r.GetPayload()) != "x" {
				t.Fatalf("Echo: %v %v", r, err)
			}
			if sc := s.last(t); hasCallMetadata(sc.md) || sc.md.Get("content-type")[0] != "application/grpc" {
				t.Fatalf("Echo carries %v", sc.md)
			}
			if _, err := signer.ListKeys(ctx, &pb.ListKeysRequest{}); err != nil {
				t.Fatal(err)
			}
			if sc := s.last(t); hasCallMetadata(sc.md) {
				t.Fatalf("ListKeys carries %v", sc.md)
			}
		})
	}
}

// What is signed is what is sent: an interceptor inside this one that
// changes the request after it was signed changes nothing on the wire.
// Without the pass-through codec, gRPC would encode the changed message
// and the server would refuse the signature.
func TestInterceptorSendsTheSignedBytes(t *testing.T) {
	id := newID(t, TypeEd25519)
	tamper := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if r, ok := req.(*pb.SignRequest); ok {
			r.Message = []byte("changed after signing")
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	s, cc := startServer(t, []*Identity{id}, UnaryClientInterceptor(id, nil), tamper)
	if _, err := pb.NewSignerServiceClient(cc).Sign(callCtx(t), &pb.SignRequest{Message: []byte("signed")}); err != nil {
		t.Fatal(err)
	}
	sc := s.last(t)
	if sc.verr != nil {
		t.Fatalf("server: %v", sc.verr)
	}
	if got := string(sc.req.(*pb.SignRequest).GetMessage()); got != "signed" {
		t.Fatalf("the server received %q, not the signed request", got)
	}

	// The control: the same tampering outside the signing interceptor is
	// signed as tampered, and arrives so.
	s, cc = startServer(t, []*Identity{id}, tamper, UnaryClientInterceptor(id, nil))
	if _, err := pb.NewSignerServiceClient(cc).Sign(callCtx(t), &pb.SignRequest{Message: []byte("signed")}); err != nil {
		t.Fatal(err)
	}
	if sc := s.last(t); sc.verr != nil || string(sc.req.(*pb.SignRequest).GetMessage()) != "changed after signing" {
		t.Fatalf("control: %v %q", sc.verr, sc.req.(*pb.SignRequest).GetMessage())
	}
}

// Compressed calls and large ones (which gRPC's proto codec would encode
// into a pooled buffer) verify too: the bytes signed are the payload
// before compression, which the server's codec sees decompressed.
func TestInterceptorCompressedAndLarge(t *testing.T) {
	id := newID(t, TypeP256)
	all := func(string) bool { return true }
	s, cc := startServer(t, []*Identity{id}, UnaryClientInterceptor(id, all))
	echo := pb.NewEchoServiceClient(cc)
	for _, size := range []int{0, 100, 64 << 10} {
		for _, opts := range [][]grpc.CallOption{nil, {grpc.UseCompressor(gzip.Name)}} {
			payload := bytes.Repeat([]byte{'z'}, size)
			r, err := echo.Echo(callCtx(t), &pb.EchoRequest{Payload: payload}, opts...)
			if err != nil || !bytes.Equal(r.GetPayload(), payload) {
				t.Fatalf("%d bytes, %d options: %v", size, len(opts), err)
			}
			if sc := s.last(t); sc.verr != nil || sc.md.Get(MDCaller)[0] != id.KeyID() {
				t.Fatalf("%d bytes, %d options: server: %v", size, len(opts), sc.verr)
			}
		}
	}
}

// Entries already in the outgoing metadata are replaced, not repeated (a
// repeated entry is refused).
func TestInterceptorReplacesEntries(t *testing.T) {
	id := newID(t, TypeEd25519)
	s, cc := startServer(t, []*Identity{id}, UnaryClientInterceptor(id, nil))
	ctx := metadata.AppendToOutgoingContext(callCtx(t), MDCaller, strings.Repeat("0", 64), MDNonce, "stale", "x-other", "kept")
	ctx = metadata.AppendToOutgoingContext(ctx, MDCaller, strings.Repeat("1", 64))
	if _, err := pb.NewSignerServiceClient(cc).Sign(ctx, &pb.SignRequest{}); err != nil {
		t.Fatal(err)
	}
	sc := s.last(t)
	if sc.verr != nil || len(sc.md[MDCaller]) != 1 || sc.md[MDCaller][0] != id.KeyID() || sc.md.Get("x-other")[0] != "kept" {
		t.Fatalf("server: %v, metadata %v", sc.verr, sc.md)
	}
}

func TestInterceptorWithoutIdentity(t *testing.T) {
	s, cc := startServer(t, nil, UnaryClientInterceptor(nil, nil))
	ctx := callCtx(t)
	_, err := pb.NewSignerServiceClient(cc).Sign(ctx, &pb.SignRequest{})
	if err == nil || !strings.Contains(err.Error(), "no identity") {
		t.Fatalf("Sign without an identity: %v", err)
	}
	if len(s.seen) != 0 {
		t.Fatal("an unsigned Sign reached the server")
	}
	if _, err := pb.NewEchoServiceClient(cc).Echo(ctx, &pb.EchoRequest{}); err != nil {
		t.Fatalf("Echo without an identity: %v", err)
	}
}

func TestDefaultMethods(t *testing.T) {
	if KeyAdminPrefix != "/"+pb.KeyAdminService_ServiceDesc.ServiceName+"/" {
		t.Fatalf("KeyAdminPrefix %q is not the service's", KeyAdminPrefix)
	}
	for _, m := range pb.KeyAdminService_ServiceDesc.Methods {
		if !DefaultMethods(KeyAdminPrefix + m.MethodName) {
			t.Errorf("KeyAdminService.%s not signed", m.MethodName)
		}
	}
	for m, want := range map[string]bool{
		"/nitrosign.v1.SignerService/Sign":            true,
		"/nitrosign.v1.KeyAdminService/CreateKey":     true,
		"/nitrosign.v1.KeyAdminService/DisableKey":    true,
		"/nitrosign.v1.KeyAdminService/EnableKey":     true,
		"/nitrosign.v1.SignerService/ListKeys":        false,
		"/nitrosign.v1.SignerService/GetPublicKey":    false,
		"/nitrosign.v1.SignerService/SignX":           false,
		"/nitrosign.v1.EchoService/Echo":              false,
		"/nitrosign.v1.AttestationService/Attest":     false,
		"/grpc.health.v1.Health/Check":                false,
		"/nitrosign.v1.KeyAdminServiceX/CreateKey":    false,
		"/nitrosign.v1.StatsService/GetStats":         false,
		"/nitrosign.v1.HostService/GetSealedKeyset":   false,
		"/nitrosign.v1.KeyAdminService":               false,
		"nitrosign.v1.SignerService/Sign":             false,
		"/nitrosign.v1.SignerService/Sign/":           false,
		"/NITROSIGN.V1.SIGNERSERVICE/SIGN":            false,
		"/nitrosign.v1.KeyAdminService/AnyFutureCall": true,
	} {
		if got := DefaultMethods(m); got != want {
			t.Errorf("DefaultMethods(%q) = %v", m, got)
		}
	}
}

// The codec hands anything but the signed request to gRPC's proto codec.
func TestSignedCodecDelegates(t *testing.T) {
	req := &pb.SignRequest{Message: []byte("m")}
	c, err := encodeRequest(req)
	if err != nil {
		t.Fatal(err)
	}
	if c.Name() != "proto" {
		t.Fatalf("Name = %q", c.Name())
	}
	other := &pb.SignRequest{Message: []byte("other")}
	b, err := c.Marshal(other)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := proto.Marshal(other)
	if !bytes.Equal(b.Materialize(), want) {
		t.Fatal("another message was not encoded by the proto codec")
	}
	b, _ = c.Marshal(req)
	if !bytes.Equal(b.Materialize(), c.data) {
		t.Fatal("the signed request was re-encoded")
	}
	var back pb.SignRequest
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(want)}, &back); err != nil || string(back.GetMessage()) != "other" {
		t.Fatalf("Unmarshal: %v", err)
	}
	if _, err := encodeRequest("not a message"); err == nil {
		t.Fatal("a string encoded")
	}
}
