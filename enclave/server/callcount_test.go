package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"

	"github.com/nitrosign/nitrosign/enclave/stats"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// callCount is one entry of GetStatsResponse.calls.
type callCount struct{ method, code string }

func callCounts(st *stats.Stats) map[callCount]uint64 {
	got := map[callCount]uint64{}
	for _, c := range st.Snapshot().GetCalls() {
		got[callCount{c.GetMethod(), c.GetCode()}] = c.GetCount()
	}
	return got
}

// waitCounts waits until st's call counts are exactly want. A call is
// counted just after its status is written, so the caller may see its
// answer a moment before the count.
func waitCounts(ctx context.Context, t *testing.T, st *stats.Stats, want map[callCount]uint64) {
	t.Helper()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		got := callCounts(st)
		if maps.Equal(got, want) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("call counts %v, want %v", got, want)
		case <-tick.C:
		}
	}
}

// rawCall sends one gRPC request with the given extra headers over an
// HTTP/2 connection of its own (headers a grpc-go client never sends), and
// returns the status it was answered with.
func rawCall(ctx context.Context, lis *bufconn.Listener, method string, header map[string]string, msg proto.Message) error {
	b, err := proto.Marshal(msg)
	if err != nil {
		return err
	}
	body := make([]byte, 5, 5+len(b)) // uncompressed flag, length, message
	binary.BigEndian.PutUint32(body[1:], uint32(len(b)))
	body = append(body, b...)
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true) // h2c with prior knowledge, as gRPC speaks it
	tr := &http.Transport{
		Protocols:   &protos,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return lis.DialContext(ctx) },
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://bufnet"+method, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("content-type", "application/grpc")
	req.Header.Set("te", "trailers")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	// A trailers-only answer carries the status in its headers.
	h := resp.Trailer
	if h.Get("grpc-status") == "" {
		h = resp.Header
	}
	code, err := strconv.Atoi(h.Get("grpc-status"))
	if err != nil {
		return fmt.Errorf("HTTP %d without a grpc-status", resp.StatusCode)
	}
	m, _ := url.PathUnescape(h.Get("grpc-message"))
	return status.Error(codes.Code(code), m)
}

// TestCallsCounted: every call the server answers is counted once, by
// method and code, through the stats handler: those its handlers and
// interceptors answer, and those grpc-go answers before any interceptor
// runs (an oversized request, an unknown method or service, an unknown
// grpc-encoding). Only what the transport refuses before a call exists (a
// malformed grpc-timeout) is not counted.
func TestCallsCounted(t *testing.T) {
	const maxRecv = 16 << 10
	st := stats.New()
	// Not started by newStatsFixture: the test service is registered after
	// New, as a late registration must still be counted under its name.
	f := newStatsFixture(t, false, configWith(func(c *Config) { c.Limits.MaxRecvMsgSize = maxRecv }), st)
	if err := f.srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	echo := pb.NewEchoServiceClient(f.conn)
	const (
		echoM   = pb.EchoService_Echo_FullMethodName
		signM   = pb.SignerService_Sign_FullMethodName
		panicM  = "/grpc.testing.TestService/UnaryCall"
		reflect = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
	)
	tests := []struct {
		name    string
		call    func(ctx context.Context) error
		code    codes.Code
		msg     string
		counted []callCount // nil: not counted
	}{
		{"ok", func(ctx context.Context) error {
			_, err := echo.Echo(ctx, &pb.EchoRequest{Payload: []byte("x")})
			return err
		}, codes.OK, "", []callCount{{echoM, "OK"}}},
		{"oversized request", func(ctx context.Context) error {
			_, err := echo.Echo(ctx, &pb.EchoRequest{Payload: make([]byte, maxRecv+1)})
			return err
		}, codes.ResourceExhausted, "larger than max", []callCount{{echoM, "ResourceExhausted"}}},
		{"unknown method of a known service", func(ctx context.Context) error {
			return f.conn.Invoke(ctx, "/nitrosign.v1.SignerService/Destroy", &pb.ListKeysRequest{}, &pb.ListKeysResponse{})
		}, codes.Unimplemented, "Destroy", []callCount{{stats.UnknownMethod, "Unimplemented"}}},
		{"unknown service", func(ctx context.Context) error {
			return f.conn.Invoke(ctx, "/no.such.Service/Call", &pb.ListKeysRequest{}, &pb.ListKeysResponse{})
		}, codes.Unimplemented, "no.such.Service", []callCount{{stats.UnknownMethod, "Unimplemented"}}},
		{"many unknown methods fold into one label", func(ctx context.Context) error {
			for i := range 20 {
				err := f.conn.Invoke(ctx, fmt.Sprintf("/random.Service%d/Method%d", i, i), &pb.ListKeysRequest{}, &pb.ListKeysResponse{})
				if status.Code(err) != codes.Unimplemented {
					return err
				}
			}
			return status.Error(codes.Unimplemented, "all 20")
		}, codes.Unimplemented, "all 20", slices.Repeat([]callCount{{stats.UnknownMethod, "Unimplemented"}}, 20)},
		{"malformed request bytes", func(ctx context.Context) error {
			return f.conn.Invoke(ctx, signM, rawMessage{0x0a, 0x7f, 0x01}, &pb.SignResponse{}, grpc.ForceCodecV2(rawCodec{}))
		}, codes.InvalidArgument, "malformed request", []callCount{{signM, "InvalidArgument"}}},
		{"handler panic", func(ctx context.Context) error {
			_, err := testgrpc.NewTestServiceClient(f.conn).UnaryCall(ctx, &testgrpc.SimpleRequest{})
			return err
		}, codes.Internal, "internal error", []callCount{{panicM, "Internal"}}},
		{"stream", func(ctx context.Context) error {
			s, err := reflectionpb.NewServerReflectionClient(f.conn).ServerReflectionInfo(ctx)
			if err != nil {
				return err
			}
			if err := s.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
				return err
			}
			if _, err := s.Recv(); err != nil {
				return err
			}
			if err := s.CloseSend(); err != nil {
				return err
			}
			if _, err := s.Recv(); !errors.Is(err, io.EOF) {
				return fmt.Errorf("after CloseSend: %v, want EOF", err)
			}
			return nil
		}, codes.OK, "", []callCount{{reflect, "OK"}}},
		{"unknown grpc-encoding", func(ctx context.Context) error {
			return rawCall(ctx, f.lis, echoM, map[string]string{"grpc-encoding": "nitrosign-none"}, &pb.EchoRequest{})
		}, codes.Unimplemented, "nitrosign-none", []callCount{{echoM, "Unimplemented"}}},
		// The transport answers this before it makes a call of the
		// stream: no stats handler sees it (stats package doc).
		{"malformed grpc-timeout: not counted", func(ctx context.Context) error {
			return rawCall(ctx, f.lis, echoM, map[string]string{"grpc-timeout": "soon"}, &pb.EchoRequest{})
		}, codes.Internal, "malformed grpc-timeout", nil},
	}
	want := map[callCount]uint64{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := ctxT(t)
			err := tt.call(ctx)
			if s := status.Convert(err); s.Code() != tt.code || !strings.Contains(s.Message(), tt.msg) {
				t.Fatalf("answered %s %q, want %s with %q", s.Code(), s.Message(), tt.code, tt.msg)
			}
			for _, k := range tt.counted {
				want[k]++
			}
			waitCounts(ctx, t, st, want)
		})
	}
	// Once the server has drained, every call has ended and been counted:
	// the counts are exact, nothing was counted twice.
	ctx := ctxT(t)
	if err := f.srv.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if got := callCounts(st); !maps.Equal(got, want) {
		t.Fatalf("after the drain: call counts %v, want %v", got, want)
	}
}
