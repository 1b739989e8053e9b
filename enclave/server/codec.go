package server

import (
	"context"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	protov2 "google.golang.org/protobuf/proto"
)

// requestCodec is the standard proto codec, except that a request whose
// bytes do not parse is reported to the caller as InvalidArgument. grpc-go
// answers a decode failure with Internal (rpc_util.go: "failed to unmarshal
// the received message"), which would blame the server for a caller's
// mistake. The codec cannot return a status itself (grpc-go rewraps it), so
// it remembers the failure for the request value and the interceptors
// below, which see that same value, turn it into the status.
type requestCodec struct {
	base encoding.CodecV2
}

var _ encoding.CodecV2 = requestCodec{}

// malformed maps a request value that failed to decode to its parse error.
// Entries live from decode to the first interceptor, a few microseconds.
var malformed sync.Map

func newRequestCodec() requestCodec {
	return requestCodec{base: encoding.GetCodecV2(proto.Name)}
}

func (c requestCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }

func (c requestCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.base.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	m, ok := v.(protov2.Message)
	if !ok {
		return err
	}
	protov2.Reset(m)
	malformed.Store(v, err)
	return nil
}

func (c requestCodec) Name() string { return c.base.Name() }

func malformedError(req any) error {
	if v, ok := malformed.LoadAndDelete(req); ok {
		return status.Errorf(codes.InvalidArgument, "malformed request: not a valid protobuf message: %v", v)
	}
	return nil
}

func unaryMalformed(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := malformedError(req); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func streamMalformed(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, malformedStream{ss})
}

type malformedStream struct{ grpc.ServerStream }

func (s malformedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return malformedError(m)
}
