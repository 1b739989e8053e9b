package server

import (
	"bytes"
	"context"
	"crypto/x509"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/enclave/stats"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	signerOnce sync.Once
	testKeys   *signer.Signer
)

func sharedSigner(t *testing.T) *signer.Signer {
	t.Helper()
	signerOnce.Do(func() {
		var err error
		testKeys, err = signer.New(signer.Params{Config: signer.Config{Ed25519: true}, Logger: zap.NewNop()})
		if err != nil {
			panic(err)
		}
	})
	return testKeys
}

// panicService panics in UnaryCall to exercise the recovery interceptor.
type panicService struct {
	testgrpc.UnimplementedTestServiceServer
}

func (panicService) UnaryCall(context.Context, *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	panic("boom")
}

type fixture struct {
	srv  *Server
	lis  *bufconn.Listener
	conn *grpc.ClientConn
	logs *observer.ObservedLogs
}

// newFixture builds a server on an in-memory listener. It is started unless
// start is false; it is stopped and the connection closed at cleanup.
func newFixture(t *testing.T, start bool, cfg Config) *fixture {
	t.Helper()
	return newStatsFixture(t, start, cfg, nil)
}

// newStatsFixture is newFixture with st counting the server's calls (none
// when nil).
func newStatsFixture(t *testing.T, start bool, cfg Config, st *stats.Stats) *fixture {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	lis := bufconn.Listen(1 << 20)
	srv, err := New(Params{Config: cfg, Logger: zap.New(core), Listener: lis, Signer: sharedSigner(t), Stats: st})
	if err != nil {
		t.Fatal(err)
	}
	testgrpc.RegisterTestServiceServer(srv.GRPC(), panicService{})
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{srv: srv, lis: lis, conn: conn, logs: logs}
	started := false
	if start {
		if err := srv.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		started = true
	}
	t.Cleanup(func() {
		conn.Close()
		if started {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Stop(ctx)
		}
	})
	return f
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestEcho(t *testing.T) {
	f := newFixture(t, true, DefaultConfig())
	c := pb.NewEchoServiceClient(f.conn)
	for _, n := range []int{0, 1, 4096, 512 << 10} {
		payload := bytes.Repeat([]byte{0xa5}, n)
		before := time.Now()
		resp, err := c.Echo(ctxT(t), &pb.EchoRequest{Payload: payload})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(resp.Payload, payload) {
			t.Fatalf("payload of %d bytes came back changed", n)
		}
		rt := resp.ReceiveTime.AsTime()
		if rt.Before(before.Add(-time.Second)) || rt.After(time.Now().Add(time.Second)) {
			t.Fatalf("receive time %v outside the call", rt)
		}
	}
}

func TestSignerRPCs(t *testing.T) {
	f := newFixture(t, true, DefaultConfig())
	c := pb.NewSignerServiceClient(f.conn)
	list, err := c.ListKeys(ctxT(t), &pb.ListKeysRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Keys) != 3 {
		t.Fatalf("ListKeys: %d keys, want 3", len(list.Keys))
	}
	msg := []byte("sign me")
	for _, k := range list.Keys {
		got, err := c.GetPublicKey(ctxT(t), &pb.GetPublicKeyRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: k.KeyType}}})
		if err != nil {
			t.Fatal(err)
		}
		if got.Key.KeyId != k.KeyId || !bytes.Equal(got.Key.PublicKey, k.PublicKey) {
			t.Fatalf("GetPublicKey(%s) differs from ListKeys", sigalg.TypeName(k.KeyType))
		}
		pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		for _, alg := range k.SigningAlgorithms {
			resp, err := c.Sign(ctxT(t), &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: k.KeyId}}, Message: msg, SigningAlgorithm: alg})
			if err != nil {
				t.Fatalf("%s: %v", sigalg.Name(alg), err)
			}
			if resp.KeyId != k.KeyId || resp.SigningAlgorithm != alg {
				t.Fatalf("response names key %s alg %s", resp.KeyId, sigalg.Name(resp.SigningAlgorithm))
			}
			if err := sigalg.Verify(pub, alg, pb.MessageType_MESSAGE_TYPE_RAW, msg, resp.Signature); err != nil {
				t.Fatalf("%s: %v", sigalg.Name(alg), err)
			}
		}
	}
}

// TestBadRequests: every malformed request gets a precise status, never
// Internal or Unknown, and the server keeps serving.
func TestBadRequests(t *testing.T) {
	f := newFixture(t, true, DefaultConfig())
	c := pb.NewSignerServiceClient(f.conn)
	ecc := &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}
	tests := []struct {
		name string
		call func(ctx context.Context) error
		code codes.Code
		msg  string
	}{
		{"empty sign", func(ctx context.Context) error { _, err := c.Sign(ctx, &pb.SignRequest{}); return err }, codes.InvalidArgument, "key is required"},
		{"unknown key type", func(ctx context.Context) error {
			_, err := c.Sign(ctx, &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: 42}}, Message: []byte("m")})
			return err
		}, codes.InvalidArgument, "unknown key_type 42"},
		{"unknown algorithm", func(ctx context.Context) error {
			_, err := c.Sign(ctx, &pb.SignRequest{Key: ecc, Message: []byte("m"), SigningAlgorithm: 1000})
			return err
		}, codes.InvalidArgument, "unknown signing_algorithm 1000"},
		{"unknown message type", func(ctx context.Context) error {
			_, err := c.Sign(ctx, &pb.SignRequest{Key: ecc, Message: []byte("m"), MessageType: -3})
			return err
		}, codes.InvalidArgument, "unknown message type"},
		{"oversized raw", func(ctx context.Context) error {
			_, err := c.Sign(ctx, &pb.SignRequest{Key: ecc, Message: make([]byte, 4097)})
			return err
		}, codes.InvalidArgument, "at most 4096"},
		{"wrong digest length", func(ctx context.Context) error {
			_, err := c.Sign(ctx, &pb.SignRequest{Key: ecc, Message: make([]byte, 20), MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST})
			return err
		}, codes.InvalidArgument, "must be 32 bytes"},
		{"algorithm does not fit", func(ctx context.Context) error {
			_, err := c.Sign(ctx, &pb.SignRequest{Key: ecc, Message: []byte("m"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256})
			return err
		}, codes.InvalidArgument, "does not fit"},
		{"unknown key id", func(ctx context.Context) error {
			_, err := c.GetPublicKey(ctx, &pb.GetPublicKeyRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: strings.Repeat("ab", 32)}}})
			return err
		}, codes.NotFound, "no key with id"},
		{"empty get public key", func(ctx context.Context) error { _, err := c.GetPublicKey(ctx, &pb.GetPublicKeyRequest{}); return err }, codes.InvalidArgument, "key is required"},
		{"oversized message", func(ctx context.Context) error {
			_, err := pb.NewEchoServiceClient(f.conn).Echo(ctx, &pb.EchoRequest{Payload: make([]byte, DefaultMaxRecvMsgSize+1)})
			return err
		}, codes.ResourceExhausted, "larger than max"},
		{"unknown method", func(ctx context.Context) error {
			return f.conn.Invoke(ctx, "/nitrosign.v1.SignerService/Destroy", &pb.ListKeysRequest{}, &pb.ListKeysResponse{})
		}, codes.Unimplemented, "Destroy"},
		{"malformed request bytes", func(ctx context.Context) error {
			// A message whose field 1 (key) claims more bytes than follow.
			return f.conn.Invoke(ctx, "/nitrosign.v1.SignerService/Sign", rawMessage{0x0a, 0x7f, 0x01}, &pb.SignResponse{}, grpc.ForceCodecV2(rawCodec{}))
		}, codes.InvalidArgument, "malformed request"},
		{"deadline already passed", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, -time.Second)
			defer cancel()
			_, err := c.Sign(ctx, &pb.SignRequest{Key: ecc, Message: []byte("m")})
			return err
		}, codes.DeadlineExceeded, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call(ctxT(t))
			st := status.Convert(err)
			if st.Code() != tt.code {
				t.Fatalf("code %s (%q), want %s", st.Code(), st.Message(), tt.code)
			}
			if !strings.Contains(st.Message(), tt.msg) {
				t.Fatalf("message %q does not say %q", st.Message(), tt.msg)
			}
			// The server still serves the next good call.
			if _, err := c.ListKeys(ctxT(t), &pb.ListKeysRequest{}); err != nil {
				t.Fatalf("server stopped serving: %v", err)
			}
		})
	}
}

func TestHealthStates(t *testing.T) {
	f := newFixture(t, false, DefaultConfig())
	h := healthpb.NewHealthClient(f.conn)
	// Not started: the listener is not served yet; the health server
	// itself says NOT_SERVING, which Start flips.
	check := func(service string) healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		resp, err := h.Check(ctxT(t), &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			t.Fatalf("Check(%q): %v", service, err)
		}
		return resp.Status
	}
	if st := f.srv.health; st == nil {
		t.Fatal("no health server")
	}
	if err := f.srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, name := range append([]string{""}, Services...) {
		if got := check(name); got != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("%q: %s after start", name, got)
		}
	}
	if _, err := h.Check(ctxT(t), &healthpb.HealthCheckRequest{Service: "nope.Service"}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown service: %v, want NotFound", err)
	}
	// Watch sees NOT_SERVING when the server starts draining.
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	w, err := h.Watch(ctx, &healthpb.HealthCheckRequest{Service: ""})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch first: %v %v", r, err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- f.srv.Stop(context.Background()) }()
	r, err := w.Recv()
	if err != nil {
		t.Fatalf("watch after stop: %v", err)
	}
	if r.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("status while draining %s", r.Status)
	}
	cancel()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
}

func TestNotServingBeforeStart(t *testing.T) {
	core, _ := observer.New(zap.DebugLevel)
	srv, err := New(Params{Config: DefaultConfig(), Logger: zap.New(core), Listener: bufconn.Listen(1024), Signer: sharedSigner(t)})
	if err != nil {
		t.Fatal(err)
	}
	// A built server holds its stream workers until Stop, served or not.
	t.Cleanup(func() { _ = srv.Stop(context.Background()) })
	resp, err := srv.health.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("before start: %v %v", resp, err)
	}
}

func TestReflectionListsServices(t *testing.T) {
	f := newFixture(t, true, DefaultConfig())
	stream, err := reflectionpb.NewServerReflectionClient(f.conn).ServerReflectionInfo(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	var got []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		got = append(got, s.Name)
	}
	sort.Strings(got)
	for _, want := range append([]string{"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"}, Services...) {
		i := sort.SearchStrings(got, want)
		if i == len(got) || got[i] != want {
			t.Fatalf("reflection lists %v, missing %s", got, want)
		}
	}
}

func TestPanicBecomesInternal(t *testing.T) {
	f := newFixture(t, true, DefaultConfig())
	_, err := testgrpc.NewTestServiceClient(f.conn).UnaryCall(ctxT(t), &testgrpc.SimpleRequest{})
	if st := status.Convert(err); st.Code() != codes.Internal || st.Message() != "internal error" {
		t.Fatalf("got %v, want Internal \"internal error\"", err)
	}
	if f.logs.FilterMessage("handler panicked").Len() != 1 {
		t.Fatal("panic not logged")
	}
	if _, err := pb.NewEchoServiceClient(f.conn).Echo(ctxT(t), &pb.EchoRequest{Payload: []byte("x")}); err != nil {
		t.Fatalf("server did not survive the panic: %v", err)
	}
}

// TestDebugLogsNoPayloads: at debug level the request log names method,
// key type, algorithm, code and latency, and no message bytes or signatures.
func TestDebugLogsNoPayloads(t *testing.T) {
	f := newFixture(t, true, DefaultConfig())
	secret := []byte("SECRET-MESSAGE-BYTES")
	resp, err := pb.NewSignerServiceClient(f.conn).Sign(ctxT(t), &pb.SignRequest{
		Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: pb.KeyType_KEY_TYPE_ECC}}, Message: secret})
	if err != nil {
		t.Fatal(err)
	}
	calls := f.logs.FilterMessage("call").All()
	if len(calls) != 1 {
		t.Fatalf("%d call log lines", len(calls))
	}
	m := calls[0].ContextMap()
	for _, k := range []string{"method", "code", "latency", "key_type", "algorithm"} {
		if _, ok := m[k]; !ok {
			t.Errorf("call log lacks %q: %v", k, m)
		}
	}
	for _, e := range f.logs.All() {
		line := e.Message
		for k, v := range e.ContextMap() {
			line += " " + k + "=" + strings.TrimSpace(strings.ReplaceAll(strings.ReplaceAll(toString(v), "\n", " "), "\t", " "))
		}
		if strings.Contains(line, string(secret)) || bytes.Contains([]byte(line), resp.Signature) {
			t.Fatalf("log line carries message or signature bytes: %s", line)
		}
	}
}

func toString(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case []byte:
		return string(x)
	default:
		return strings.TrimSpace(strings.Trim(strings.ReplaceAll(fmtAny(x), "\n", " "), " "))
	}
}

// TestGarbageOnPort writes garbage and an HTTP/1.1 request to the port: the
// connection is closed and the server keeps serving.
func TestGarbageOnPort(t *testing.T) {
	f := newFixture(t, true, configWith(func(c *Config) { c.Limits.HandshakeTimeout = time.Second }))
	for _, junk := range [][]byte{
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		bytes.Repeat([]byte{0xff, 0x00, 0x13}, 1000),
		[]byte("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), // a TLS ClientHello's first bytes
	} {
		c, err := f.lis.DialContext(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Write(junk)
		// The server answers with at most a GOAWAY/settings frame and closes.
		if _, err := io.ReadAll(c); err != nil && !isClosed(err) {
			t.Fatalf("connection not closed after garbage: %v", err)
		}
		c.Close()
		if _, err := pb.NewEchoServiceClient(f.conn).Echo(ctxT(t), &pb.EchoRequest{}); err != nil {
			t.Fatalf("server stopped serving after garbage: %v", err)
		}
	}
}

func isClosed(err error) bool {
	return err == io.EOF || strings.Contains(err.Error(), "closed")
}

// TestGracefulStop: a call in flight when Stop begins completes; new calls
// are refused; Stop returns.
func TestGracefulStop(t *testing.T) {
	f := newFixture(t, true, configWith(func(c *Config) { c.GracefulStopTimeout = 5 * time.Second }))
	// Hold a stream open to observe the drain: Watch keeps an RPC in flight.
	ctx, cancel := context.WithCancel(ctxT(t))
	w, err := healthpb.NewHealthClient(f.conn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatal(err)
	}
	stopped := make(chan struct{})
	go func() {
		_ = f.srv.Stop(context.Background())
		close(stopped)
	}()
	select {
	case <-stopped:
		t.Fatal("Stop returned while a call was in flight")
	case <-time.After(200 * time.Millisecond):
	}
	cancel() // the in-flight call ends; the drain completes
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("Stop did not return after the last call ended")
	}
	if _, err := pb.NewEchoServiceClient(f.conn).Echo(ctxT(t), &pb.EchoRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("call after stop: %v, want Unavailable", err)
	}
}

func TestGracefulStopTimeout(t *testing.T) {
	f := newFixture(t, true, configWith(func(c *Config) { c.GracefulStopTimeout = 100 * time.Millisecond }))
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	w, err := healthpb.NewHealthClient(f.conn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := f.srv.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) > 3*time.Second {
		t.Fatalf("Stop took %s with a 100ms graceful timeout", time.Since(start))
	}
	for {
		if _, err := w.Recv(); err != nil {
			break
		}
	}
}
