package proxy

import (
	"context"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/internal/requestid"
)

// requestIDUnary gives the call a request id (the client's x-request-id
// when well formed, else a new one) in its context and in its incoming
// metadata, which the forwarding copies upstream: the enclave logs the
// same id.
func requestIDUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	ctx, _ = requestid.Ensure(ctx)
	return h(ctx, req)
}

// requestIDStream is requestIDUnary for streams (every forwarded call).
func requestIDStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	ctx, _ := requestid.Ensure(ss.Context())
	return h(srv, &ctxStream{ServerStream: ss, ctx: ctx})
}

// ctxStream is a ServerStream with another context.
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }

// observeUnary reports each call to o.
func observeUnary(o Observer) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		o.CallStarted(info.FullMethod)
		start := time.Now()
		resp, err := h(ctx, req)
		o.CallFinished(info.FullMethod, status.Code(err), time.Since(start))
		return resp, err
	}
}

// observeStream is observeUnary for streams.
func observeStream(o Observer) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		o.CallStarted(info.FullMethod)
		start := time.Now()
		err := h(srv, ss)
		o.CallFinished(info.FullMethod, status.Code(err), time.Since(start))
		return err
	}
}

// errPanic is what a caller sees when a handler panicked; the panic value
// stays in the log.
var errPanic = status.Error(codes.Internal, "proxy: internal error")

// recovered logs a panic value and returns the status the caller gets.
func recovered(log *zap.Logger, method string, v any) error {
	log.Error("panic in handler", zap.String("method", method), zap.Any("panic", v), zap.Stack("stack"))
	return errPanic
}

// recoverUnary turns a handler panic into codes.Internal; the process lives.
func recoverUnary(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if v := recover(); v != nil {
				resp, err = nil, recovered(log, info.FullMethod, v)
			}
		}()
		return h(ctx, req)
	}
}

// recoverStream is recoverUnary for streams. Goroutines a handler starts
// recover on their own (see forward).
func recoverStream(log *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
		defer func() {
			if v := recover(); v != nil {
				err = recovered(log, info.FullMethod, v)
			}
		}()
		return h(srv, ss)
	}
}

// logUnary logs each call at debug level: method, code, latency, peer and
// request id, never payloads or other metadata.
func logUnary(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if !log.Core().Enabled(zapcore.DebugLevel) {
			return h(ctx, req)
		}
		start := time.Now()
		resp, err := h(ctx, req)
		logCall(log, ctx, info.FullMethod, err, time.Since(start))
		return resp, err
	}
}

// logStream is logUnary for streams, which is every forwarded call.
func logStream(log *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if !log.Core().Enabled(zapcore.DebugLevel) {
			return h(srv, ss)
		}
		start := time.Now()
		err := h(srv, ss)
		// For the unknown-service handler too, FullMethod is the called method.
		logCall(log, ss.Context(), info.FullMethod, err, time.Since(start))
		return err
	}
}

func logCall(log *zap.Logger, ctx context.Context, method string, err error, d time.Duration) {
	fields := []zap.Field{
		zap.String("method", method),
		zap.Stringer("code", status.Code(err)),
		zap.Duration("latency", d),
		requestid.Field(ctx),
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		fields = append(fields, zap.Stringer("peer", p.Addr))
	}
	log.Debug("call", fields...)
}
