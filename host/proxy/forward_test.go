package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	refpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/host/proxy"
	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Every nitrosign RPC and the interop unary RPCs go through unchanged, both
// ways.
func TestForwardUnary(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	key := &nitrosignv1.KeyInfo{
		KeyId:                   "ab12",
		KeyType:                 nitrosignv1.KeyType_KEY_TYPE_ECC,
		KeySpec:                 nitrosignv1.KeySpec_KEY_SPEC_ECC_NIST_P256,
		PublicKey:               []byte{0x30, 0x59, 0x01},
		SigningAlgorithms:       []nitrosignv1.SigningAlgorithm{nitrosignv1.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256},
		DefaultSigningAlgorithm: nitrosignv1.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256,
		CreateTime:              timestamppb.New(time.Unix(1700000000, 0)),
	}
	var (
		mu   sync.Mutex
		seen proto.Message // the last request the upstream got
	)
	record := func(ctx context.Context, m proto.Message) {
		if md, _ := metadata.FromIncomingContext(ctx); len(md.Get("user-agent")) > 0 && strings.HasPrefix(md.Get("user-agent")[0], "nitrosign-proxy") {
			return // the proxy's own call (its keyset check), not the client's
		}
		mu.Lock()
		seen = proto.Clone(m)
		mu.Unlock()
	}
	h.up.Signer.SignF.Set(func(ctx context.Context, req *nitrosignv1.SignRequest) (*nitrosignv1.SignResponse, error) {
		record(ctx, req)
		return &nitrosignv1.SignResponse{KeyId: "ab12", SigningAlgorithm: req.GetSigningAlgorithm(), Signature: []byte("sig")}, nil
	})
	h.up.Signer.GetPublicKeyF.Set(func(ctx context.Context, req *nitrosignv1.GetPublicKeyRequest) (*nitrosignv1.GetPublicKeyResponse, error) {
		record(ctx, req)
		return &nitrosignv1.GetPublicKeyResponse{Key: key}, nil
	})
	h.up.Signer.ListKeysF.Set(func(ctx context.Context, req *nitrosignv1.ListKeysRequest) (*nitrosignv1.ListKeysResponse, error) {
		record(ctx, req)
		return &nitrosignv1.ListKeysResponse{Keys: []*nitrosignv1.KeyInfo{key, key}}, nil
	})
	h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
		record(ctx, req)
		return &nitrosignv1.EchoResponse{Payload: req.GetPayload(), ReceiveTime: timestamppb.New(time.Unix(5, 6))}, nil
	})
	signer := nitrosignv1.NewSignerServiceClient(h.cc)
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	test := testpb.NewTestServiceClient(h.cc)
	big := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB: many HTTP/2 frames, pooled buffers

	tests := []struct {
		name     string
		req      proto.Message
		call     func(context.Context, proto.Message) (proto.Message, error)
		want     proto.Message
		wantSeen bool // the upstream stub records the request
	}{
		{"Sign", &nitrosignv1.SignRequest{
			Key:              &nitrosignv1.KeySelector{Selector: &nitrosignv1.KeySelector_KeyType{KeyType: nitrosignv1.KeyType_KEY_TYPE_ECC}},
			Message:          []byte("hello"),
			MessageType:      nitrosignv1.MessageType_MESSAGE_TYPE_RAW,
			SigningAlgorithm: nitrosignv1.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256,
		}, func(ctx context.Context, m proto.Message) (proto.Message, error) {
			return signer.Sign(ctx, m.(*nitrosignv1.SignRequest))
		}, &nitrosignv1.SignResponse{KeyId: "ab12", SigningAlgorithm: nitrosignv1.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256, Signature: []byte("sig")}, true},
		{"GetPublicKey", &nitrosignv1.GetPublicKeyRequest{
			Key: &nitrosignv1.KeySelector{Selector: &nitrosignv1.KeySelector_KeyId{KeyId: "ab12"}},
		}, func(ctx context.Context, m proto.Message) (proto.Message, error) {
			return signer.GetPublicKey(ctx, m.(*nitrosignv1.GetPublicKeyRequest))
		}, &nitrosignv1.GetPublicKeyResponse{Key: key}, true},
		{"ListKeys", &nitrosignv1.ListKeysRequest{}, func(ctx context.Context, m proto.Message) (proto.Message, error) {
			return signer.ListKeys(ctx, m.(*nitrosignv1.ListKeysRequest))
		}, &nitrosignv1.ListKeysResponse{Keys: []*nitrosignv1.KeyInfo{key, key}}, true},
		{"Echo small", &nitrosignv1.EchoRequest{Payload: []byte("ping")}, func(ctx context.Context, m proto.Message) (proto.Message, error) {
			return echo.Echo(ctx, m.(*nitrosignv1.EchoRequest))
		}, &nitrosignv1.EchoResponse{Payload: []byte("ping"), ReceiveTime: timestamppb.New(time.Unix(5, 6))}, true},
		{"Echo empty", &nitrosignv1.EchoRequest{}, func(ctx context.Context, m proto.Message) (proto.Message, error) {
			return echo.Echo(ctx, m.(*nitrosignv1.EchoRequest))
		}, &nitrosignv1.EchoResponse{ReceiveTime: timestamppb.New(time.Unix(5, 6))}, true},
		{"Echo 1MiB", &nitrosignv1.EchoRequest{Payload: big}, func(ctx context.Context, m proto.Message) (proto.Message, error) {
			return echo.Echo(ctx, m.(*nitrosignv1.EchoRequest))
		}, &nitrosignv1.EchoResponse{Payload: big, ReceiveTime: timestamppb.New(time.Unix(5, 6))}, true},
		{"interop EmptyCall", &testpb.Empty{}, func(ctx context.Context, m proto.Message) (proto.Message, error) {
			return test.EmptyCall(ctx, m.(*testpb.Empty))
		}, &testpb.Empty{}, false},
		{"interop UnaryCall", &testpb.SimpleRequest{ResponseSize: 3000}, func(ctx context.Context, m proto.Message) (proto.Message, error) {
			return test.UnaryCall(ctx, m.(*testpb.SimpleRequest))
		}, &testpb.SimpleResponse{Payload: &testpb.Payload{Body: make([]byte, 3000)}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.call(callCtx(t), tt.req)
			if err != nil {
				t.Fatalf("call: %v", err)
			}
			if !proto.Equal(got, tt.want) {
				t.Fatalf("response differs:\n got %v\nwant %v", got, tt.want)
			}
			if tt.wantSeen {
				mu.Lock()
				defer mu.Unlock()
				if !proto.Equal(seen, tt.req) {
					t.Fatalf("upstream got %v, client sent %v", seen, tt.req)
				}
			}
		})
	}
}

// spyCodec is the upstream's codec: it records Echo bytes as they crossed
// the wire, and makes its Echo responses non-canonical (a field repeated),
// which a decode/re-encode in the proxy would normalise away.
type spyCodec struct {
	proto encoding.CodecV2

	mu   sync.Mutex
	recv [][]byte
	sent [][]byte
}

func (s *spyCodec) Name() string { return "proto" }

func (s *spyCodec) Marshal(v any) (mem.BufferSlice, error) {
	out, err := s.proto.Marshal(v)
	if err != nil {
		return nil, err
	}
	resp, ok := v.(*nitrosignv1.EchoResponse)
	if !ok {
		return out, nil
	}
	b := out.Materialize()
	out.Free()
	// Field 1 (payload) again: valid protobuf (last one wins), not canonical.
	b = append(b, 0x0a, byte(len(resp.GetPayload())))
	b = append(b, resp.GetPayload()...)
	s.mu.Lock()
	s.sent = append(s.sent, b)
	s.mu.Unlock()
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

func (s *spyCodec) Unmarshal(d mem.BufferSlice, v any) error {
	if _, ok := v.(*nitrosignv1.EchoRequest); ok {
		s.mu.Lock()
		s.recv = append(s.recv, d.Materialize())
		s.mu.Unlock()
	}
	return s.proto.Unmarshal(d, v)
}

func TestBytesNotReencoded(t *testing.T) {
	spy := &spyCodec{proto: encoding.GetCodecV2("proto")}
	h := newHarness(t, harnessOpts{upOpts: []grpc.ServerOption{grpc.ForceServerCodecV2(spy)}})

	// payload "a", then payload "bc" again (last wins), then unknown field
	// 99 (varint 7): a decode/re-encode would keep only "bc" and move or
	// keep the unknown field, changing the bytes.
	req := []byte{0x0a, 0x01, 'a', 0x0a, 0x02, 'b', 'c', 0x98, 0x06, 0x07}
	var resp rawMsg
	err := h.cc.Invoke(callCtx(t), nitrosignv1.EchoService_Echo_FullMethodName, &rawMsg{b: req}, &resp, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		t.Fatalf("Echo: %v", err)
	}
	spy.mu.Lock()
	defer spy.mu.Unlock()
	if len(spy.recv) != 1 || !bytes.Equal(spy.recv[0], req) {
		t.Fatalf("upstream received %x, client sent %x", spy.recv, req)
	}
	if len(spy.sent) != 1 || !bytes.Equal(resp.b, spy.sent[0]) {
		t.Fatalf("client received %x, upstream sent %x", resp.b, spy.sent)
	}
}

func mustDetails(t *testing.T, st *status.Status, details ...protoadapt.MessageV1) *status.Status {
	t.Helper()
	out, err := st.WithDetails(details...)
	if err != nil {
		t.Fatalf("WithDetails: %v", err)
	}
	return out
}

func TestStatusHeadersTrailers(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	detailed := mustDetails(t, status.New(codes.FailedPrecondition, "key is busy: try later"),
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "message", Description: "too long"}}},
		&errdetails.ErrorInfo{Reason: "KEY_BUSY", Domain: "nitrosign", Metadata: map[string]string{"k": "v"}},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(3 * time.Second)},
	)
	tests := []struct {
		name      string
		header    metadata.MD // set by the upstream before answering
		trailer   metadata.MD
		err       *status.Status // nil: OK
		sendFirst bool           // SendHeader before returning
	}{
		{"ok with header and trailer", metadata.Pairs("x-h", "v1", "x-h", "v2", "x-h-bin", "\x00\xffbin"), metadata.Pairs("x-t", "t1", "x-t-bin", "\x01\x02"), nil, false},
		{"error with details, header and trailer", metadata.Pairs("x-h", "v1"), metadata.Pairs("x-t", "t1"), detailed, false},
		{"error with details after sent header", metadata.Pairs("x-h", "v1"), metadata.Pairs("x-t", "t1"), detailed, true},
		{"trailers-only error", nil, nil, status.New(codes.NotFound, "no key with id ff"), false},
		{"trailers-only error with trailer", nil, metadata.Pairs("x-t", "only"), status.New(codes.InvalidArgument, "message type DIGEST: want 32 bytes, got 3"), false},
		{"unicode message", nil, nil, status.New(codes.ResourceExhausted, "trop de requêtes: 超过 ✓ %%"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
				if tt.header != nil {
					if err := grpc.SetHeader(ctx, tt.header); err != nil {
						return nil, err
					}
				}
				if tt.sendFirst {
					if err := grpc.SendHeader(ctx, nil); err != nil {
						return nil, err
					}
				}
				if tt.trailer != nil {
					if err := grpc.SetTrailer(ctx, tt.trailer); err != nil {
						return nil, err
					}
				}
				if tt.err != nil {
					return nil, tt.err.Err()
				}
				return &nitrosignv1.EchoResponse{Payload: req.GetPayload()}, nil
			})
			var hdr, trl metadata.MD
			_, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(callCtx(t), &nitrosignv1.EchoRequest{Payload: []byte("x")},
				grpc.Header(&hdr), grpc.Trailer(&trl))
			if tt.err == nil {
				if err != nil {
					t.Fatalf("Echo: %v", err)
				}
			} else {
				got, ok := status.FromError(err)
				if !ok {
					t.Fatalf("not a status error: %v", err)
				}
				if !proto.Equal(got.Proto(), tt.err.Proto()) {
					t.Fatalf("status differs:\n got %v\nwant %v", got.Proto(), tt.err.Proto())
				}
			}
			for k, want := range tt.header {
				if got := hdr.Get(k); !equalStrings(got, want) {
					t.Errorf("header %q = %q, want %q", k, got, want)
				}
			}
			for k, want := range tt.trailer {
				if got := trl.Get(k); !equalStrings(got, want) {
					t.Errorf("trailer %q = %q, want %q", k, got, want)
				}
			}
			// The status travels once: the proxy must not copy the enclave's
			// grpc-status-details-bin trailer next to its own.
			if v := trl.Get("grpc-status-details-bin"); len(v) > 1 {
				t.Errorf("grpc-status-details-bin sent %d times", len(v))
			}
		})
	}
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestMetadataDeadlineCancel(t *testing.T) {
	h := newHarness(t, harnessOpts{})

	t.Run("metadata arrives", func(t *testing.T) {
		got := make(chan metadata.MD, 1)
		h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
			md, _ := metadata.FromIncomingContext(ctx)
			got <- md
			return &nitrosignv1.EchoResponse{}, nil
		})
		sent := metadata.Pairs("x-a", "1", "x-a", "2", "authorization", "Bearer t0k3n", "x-id-bin", "\x00\x01\xfe")
		ctx := metadata.NewOutgoingContext(callCtx(t), sent)
		if _, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(ctx, &nitrosignv1.EchoRequest{}); err != nil {
			t.Fatalf("Echo: %v", err)
		}
		md := <-got
		for k, want := range sent {
			if v := md.Get(k); !equalStrings(v, want) {
				t.Errorf("upstream metadata %q = %q, want %q", k, v, want)
			}
		}
		// One user-agent (the proxy's client), not the client's as well.
		if ua := md.Get("user-agent"); len(ua) != 1 {
			t.Errorf("upstream user-agent %q, want exactly one", ua)
		}
	})

	t.Run("deadline arrives", func(t *testing.T) {
		got := make(chan time.Time, 1)
		h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
			d, _ := ctx.Deadline() // zero when there is none
			got <- d
			return &nitrosignv1.EchoResponse{}, nil
		})
		ctx, cancel := context.WithTimeout(context.Background(), 7*time.Second)
		defer cancel()
		want, _ := ctx.Deadline()
		if _, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(ctx, &nitrosignv1.EchoRequest{}); err != nil {
			t.Fatalf("Echo: %v", err)
		}
		d := <-got
		if d.IsZero() {
			t.Fatal("upstream handler has no deadline")
		}
		// grpc-timeout is relative, so two hops can only lose time; a
		// loose bound: never later, and not seconds earlier.
		if d.After(want.Add(50*time.Millisecond)) || d.Before(want.Add(-2*time.Second)) {
			t.Fatalf("upstream deadline %v, client deadline %v", d, want)
		}
	})

	t.Run("deadline exceeded", func(t *testing.T) {
		h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
			<-ctx.Done()
			return nil, status.FromContextError(ctx.Err()).Err()
		})
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if _, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(ctx, &nitrosignv1.EchoRequest{}); status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("Echo = %v, want DeadlineExceeded", err)
		}
	})

	t.Run("cancellation cancels upstream", func(t *testing.T) {
		entered, canceled := make(chan struct{}), make(chan struct{})
		h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
			close(entered)
			select {
			case <-ctx.Done():
				close(canceled)
				return nil, ctx.Err()
			case <-time.After(10 * time.Second):
				return nil, status.Error(codes.Internal, "not canceled")
			}
		})
		ctx, cancel := context.WithCancel(callCtx(t))
		errc := make(chan error, 1)
		go func() {
			_, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(ctx, &nitrosignv1.EchoRequest{})
			errc <- err
		}()
		<-entered
		cancel()
		if err := <-errc; status.Code(err) != codes.Canceled {
			t.Errorf("Echo = %v, want Canceled", err)
		}
		select {
		case <-canceled:
		case <-time.After(5 * time.Second):
			t.Fatal("upstream handler was not canceled")
		}
	})

	t.Run("stream cancellation cancels upstream", func(t *testing.T) {
		canceled := make(chan struct{})
		h.up.Test.FullDuplexCallF.Set(func(stream testpb.TestService_FullDuplexCallServer) error {
			if _, err := stream.Recv(); err != nil {
				return err
			}
			if err := stream.Send(&testpb.StreamingOutputCallResponse{}); err != nil {
				return err
			}
			<-stream.Context().Done()
			close(canceled)
			return stream.Context().Err()
		})
		ctx, cancel := context.WithCancel(callCtx(t))
		s, err := testpb.NewTestServiceClient(h.cc).FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&testpb.StreamingOutputCallRequest{}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); err != nil {
			t.Fatal(err)
		}
		cancel()
		select {
		case <-canceled:
		case <-time.After(5 * time.Second):
			t.Fatal("upstream stream was not canceled")
		}
	})
}

func TestStreaming(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	client := testpb.NewTestServiceClient(h.cc)
	sizes := []int32{0, 1, 1000, 70000, 1 << 20}
	params := func(s ...int32) []*testpb.ResponseParameters {
		var out []*testpb.ResponseParameters
		for _, n := range s {
			out = append(out, &testpb.ResponseParameters{Size: n})
		}
		return out
	}
	checkResp := func(t *testing.T, i int, resp *testpb.StreamingOutputCallResponse, want int32) {
		t.Helper()
		body := resp.GetPayload().GetBody()
		if int32(len(body)) != want || (want > 0 && body[0] != byte(i)) {
			t.Fatalf("response %d: %d bytes starting %v, want %d starting %d", i, len(body), body[:min(1, len(body))], want, i)
		}
	}

	t.Run("server streaming", func(t *testing.T) {
		s, err := client.StreamingOutputCall(callCtx(t), &testpb.StreamingOutputCallRequest{ResponseParameters: params(sizes...)})
		if err != nil {
			t.Fatal(err)
		}
		for i, n := range sizes {
			resp, err := s.Recv()
			if err != nil {
				t.Fatalf("Recv %d: %v", i, err)
			}
			checkResp(t, i, resp, n)
		}
		if _, err := s.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("final Recv = %v, want EOF", err)
		}
	})

	t.Run("server streaming error after messages", func(t *testing.T) {
		h.up.Test.StreamingOutputCallF.Set(func(req *testpb.StreamingOutputCallRequest, stream testpb.TestService_StreamingOutputCallServer) error {
			for range 3 {
				if err := stream.Send(&testpb.StreamingOutputCallResponse{}); err != nil {
					return err
				}
			}
			return status.Error(codes.Aborted, "enclave draining")
		})
		defer func() { h.up.Test.StreamingOutputCallF.Reset() }()
		s, err := client.StreamingOutputCall(callCtx(t), &testpb.StreamingOutputCallRequest{})
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for {
			_, err := s.Recv()
			if err != nil {
				if status.Code(err) != codes.Aborted || status.Convert(err).Message() != "enclave draining" || n != 3 {
					t.Fatalf("after %d messages: %v, want 3 then Aborted", n, err)
				}
				break
			}
			n++
		}
	})

	t.Run("client streaming", func(t *testing.T) {
		s, err := client.StreamingInputCall(callCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		var sum int32
		for _, n := range sizes {
			if err := s.Send(&testpb.StreamingInputCallRequest{Payload: &testpb.Payload{Body: make([]byte, n)}}); err != nil {
				t.Fatalf("Send: %v", err)
			}
			sum += n
		}
		resp, err := s.CloseAndRecv()
		if err != nil {
			t.Fatalf("CloseAndRecv: %v", err)
		}
		if resp.GetAggregatedPayloadSize() != sum {
			t.Fatalf("aggregated %d, want %d", resp.GetAggregatedPayloadSize(), sum)
		}
	})

	t.Run("bidi ping-pong", func(t *testing.T) {
		// Lock-step: each answer must arrive before the next request is
		// sent, which fails if the proxy buffered a direction.
		s, err := client.FullDuplexCall(callCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		for i, n := range sizes {
			if err := s.Send(&testpb.StreamingOutputCallRequest{ResponseParameters: params(n)}); err != nil {
				t.Fatalf("Send %d: %v", i, err)
			}
			resp, err := s.Recv()
			if err != nil {
				t.Fatalf("Recv %d: %v", i, err)
			}
			checkResp(t, 0, resp, n)
		}
		if err := s.CloseSend(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("final Recv = %v, want EOF", err)
		}
	})

	t.Run("bidi half duplex", func(t *testing.T) {
		s, err := client.HalfDuplexCall(callCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range sizes {
			if err := s.Send(&testpb.StreamingOutputCallRequest{ResponseParameters: params(n)}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.CloseSend(); err != nil {
			t.Fatal(err)
		}
		for i, n := range sizes {
			resp, err := s.Recv()
			if err != nil {
				t.Fatalf("Recv %d: %v", i, err)
			}
			checkResp(t, 0, resp, n)
		}
		if _, err := s.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("final Recv = %v, want EOF", err)
		}
	})

	t.Run("upstream ends before client half-closes", func(t *testing.T) {
		h.up.Test.FullDuplexCallF.Set(func(stream testpb.TestService_FullDuplexCallServer) error {
			if _, err := stream.Recv(); err != nil {
				return err
			}
			return status.Error(codes.PermissionDenied, "one is enough")
		})
		defer func() { h.up.Test.FullDuplexCallF.Reset() }()
		s, err := client.FullDuplexCall(callCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&testpb.StreamingOutputCallRequest{}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("Recv = %v, want PermissionDenied", err)
		}
	})
}

func TestUnknownMethodIsEnclaveAnswer(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	err := h.cc.Invoke(callCtx(t), "/nitrosign.v1.NoSuchService/Nope", &testpb.Empty{}, &testpb.Empty{})
	if status.Code(err) != codes.Unimplemented || !strings.Contains(status.Convert(err).Message(), "nitrosign.v1.NoSuchService") {
		t.Fatalf("unknown method: %v, want the enclave's Unimplemented", err)
	}
}

func TestReflectionForwarded(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	s, err := refpb.NewServerReflectionClient(h.cc).ServerReflectionInfo(callCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&refpb.ServerReflectionRequest{MessageRequest: &refpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := s.Recv()
	if err != nil {
		t.Fatalf("reflection through the proxy: %v", err)
	}
	got := map[string]bool{}
	for _, svc := range resp.GetListServicesResponse().GetService() {
		got[svc.GetName()] = true
	}
	for _, want := range []string{"nitrosign.v1.EchoService", "nitrosign.v1.SignerService", "grpc.health.v1.Health"} {
		if !got[want] {
			t.Errorf("reflection lists %v, missing %s", got, want)
		}
	}
	_ = s.CloseSend()
}

func TestConcurrentCallersSpread(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	h.waitAllReady(t)
	h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
		time.Sleep(time.Millisecond) // calls overlap, so least-loaded matters
		return &nitrosignv1.EchoResponse{Payload: req.GetPayload()}, nil
	})
	h.up.ResetPeers()
	const callers, perCaller, size = 64, 10, 4
	// Each caller has its own client connection, as separate services would.
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		cc := dialProxy(t, h.addr)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := nitrosignv1.NewEchoServiceClient(cc)
			for range perCaller {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := c.Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("x")})
				cancel()
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Echo: %v", err)
	}
	const total = callers * perCaller
	var sum uint64
	for i, n := range h.proxy.UpstreamCalls() {
		sum += n
		if n < total/size/2 {
			t.Errorf("upstream slot %d carried %d of %d calls, want at least %d", i, n, total, total/size/2)
		}
	}
	if sum < total {
		t.Errorf("upstream slots counted %d calls, want >= %d", sum, total)
	}
	peers := h.up.Peers()
	if len(peers) != size {
		t.Fatalf("upstream saw %d connections, want %d: %v", len(peers), size, peers)
	}
	for addr, n := range peers {
		if n < total/size/2 {
			t.Errorf("upstream connection %s carried %d calls, want at least %d", addr, n, total/size/2)
		}
	}
}

func TestUpstreamDownAndBack(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	h.waitAllReady(t)
	health := newHealthClient(h.cc)
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	health.waitStatus(t, "", servingStatus)

	h.up.Stop()
	// A 1s deadline turns a hang into DeadlineExceeded: Unavailable proves
	// the call failed fast.
	for i := range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{})
		cancel()
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("call %d with upstream down: %v, want Unavailable", i, err)
		}
	}
	health.waitStatus(t, "", notServingStatus)
	_, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{})
	if want := "no ready upstream connection to tcp://" + h.up.Addr(); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), want) {
		t.Fatalf("call with no ready connection: %v, want Unavailable %q", err, want)
	}

	h.up.Restart()
	health.waitStatus(t, "", servingStatus)
	for range 8 {
		if _, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{Payload: []byte("back")}); err != nil {
			t.Fatalf("Echo after restart: %v", err)
		}
	}
}

func TestNoUpstreamAtStart(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	h.up.Stop()
	eventually(t, 5*time.Second, "pool not ready", func() bool { return h.pool.Ready() == 0 })
	_, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(callCtx(t), &nitrosignv1.EchoRequest{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "enclave down or not serving") {
		t.Fatalf("Echo = %v, want Unavailable with a clear message", err)
	}
}

// Garbage on the proxy port closes that connection; the proxy serves on.
func TestBadClients(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	tests := []struct {
		name string
		send []byte
	}{
		{"garbage", []byte("\x00\x01\x02 this is not HTTP/2 \xff\xfe\r\n\r\n")},
		{"HTTP/1.1", []byte("GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl\r\n\r\n")},
		{"HTTP/1.1 POST grpc path", []byte("POST /nitrosign.v1.EchoService/Echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\nContent-Length: 5\r\n\r\n\x00\x00\x00\x00\x00")},
		{"HTTP/2 preface then garbage frame", append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), bytes.Repeat([]byte{0xff}, 64)...)},
		{"connect and close", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if tt.send == nil {
				return
			}
			if _, err := c.Write(tt.send); err != nil {
				t.Fatalf("write: %v", err)
			}
			// The proxy must close the connection (EOF or reset), not keep it.
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err = io.Copy(io.Discard, bufio.NewReader(c))
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("proxy kept a garbage connection open")
			}
		})
		if _, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(callCtx(t), &nitrosignv1.EchoRequest{Payload: []byte("ok")}); err != nil {
			t.Fatalf("good call after %s: %v", tt.name, err)
		}
	}
}

func TestMessageSizeLimits(t *testing.T) {
	h := newHarness(t, harnessOpts{mutate: func(c *proxy.Config) {
		c.Limits.MaxRecvMsgSize = 1 << 10
		c.MaxSendMsgSize = 2 << 10
	}})
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	tests := []struct {
		name     string
		payload  int
		respSize int // upstream response payload; -1 echoes
		want     codes.Code
	}{
		{"small", 10, -1, codes.OK},
		{"request too large", 2 << 10, -1, codes.ResourceExhausted},
		{"response too large", 10, 4 << 10, codes.ResourceExhausted},
		{"small again", 10, -1, codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h.up.Echo.EchoF.Set(func(ctx context.Context, req *nitrosignv1.EchoRequest) (*nitrosignv1.EchoResponse, error) {
				if tt.respSize >= 0 {
					return &nitrosignv1.EchoResponse{Payload: make([]byte, tt.respSize)}, nil
				}
				return &nitrosignv1.EchoResponse{Payload: req.GetPayload()}, nil
			})
			_, err := echo.Echo(callCtx(t), &nitrosignv1.EchoRequest{Payload: make([]byte, tt.payload)})
			if status.Code(err) != tt.want {
				t.Fatalf("Echo = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestCompressedClient(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	payload := bytes.Repeat([]byte("compress me "), 1000)
	resp, err := nitrosignv1.NewEchoServiceClient(h.cc).Echo(callCtx(t), &nitrosignv1.EchoRequest{Payload: payload},
		grpc.UseCompressor("gzip"))
	if err != nil {
		t.Fatalf("gzip Echo through the proxy: %v", err)
	}
	if !bytes.Equal(resp.GetPayload(), payload) {
		t.Fatal("payload changed")
	}
}
