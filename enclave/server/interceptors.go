package server

import (
	"context"
	"runtime/debug"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/internal/requestid"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// unaryRecovery turns a handler panic into Internal, logs it with its stack,
// and keeps the process serving. The panic value is logged, not returned.
func unaryRecovery(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error("handler panicked", zap.String("method", info.FullMethod), zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
				resp, err = nil, status.Error(codes.Internal, "internal error")
			}
		}()
		return handler(ctx, req)
	}
}

func streamRecovery(log *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error("handler panicked", zap.String("method", info.FullMethod), zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
				err = status.Error(codes.Internal, "internal error")
			}
		}()
		return handler(srv, ss)
	}
}

// unaryLogging logs each call at debug level: method, request id (set by
// the host proxy), key selector and algorithm for Sign, status code and
// latency. Payloads, messages and signatures are never logged. At info
// level it costs one level check.
func unaryLogging(log *zap.Logger) grpc.UnaryServerInterceptor {
	log = log.Named("rpc")
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if !log.Core().Enabled(zapcore.DebugLevel) {
			return handler(ctx, req)
		}
		start := time.Now()
		resp, err := handler(ctx, req)
		fields := append(make([]zap.Field, 0, 8),
			zap.String("method", info.FullMethod),
			zap.String("code", status.Code(err).String()),
			zap.Duration("latency", time.Since(start)),
			requestid.Field(ctx))
		if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
			fields = append(fields, zap.String("peer", p.Addr.String()))
		}
		fields = append(fields, requestFields(req)...)
		if err != nil {
			fields = append(fields, zap.String("error", status.Convert(err).Message()))
		}
		log.Debug("call", fields...)
		return resp, err
	}
}

func streamLogging(log *zap.Logger) grpc.StreamServerInterceptor {
	log = log.Named("rpc")
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if !log.Core().Enabled(zapcore.DebugLevel) {
			return handler(srv, ss)
		}
		start := time.Now()
		err := handler(srv, ss)
		log.Debug("stream", zap.String("method", info.FullMethod), zap.String("code", status.Code(err).String()), zap.Duration("latency", time.Since(start)),
			requestid.Field(ss.Context()))
		return err
	}
}

// requestFields describes a request by its selectors only.
func requestFields(req any) []zap.Field {
	var sel *pb.KeySelector
	var f []zap.Field
	switch r := req.(type) {
	case *pb.SignRequest:
		sel = r.GetKey()
		f = append(f, zap.String("algorithm", sigalg.Name(r.GetSigningAlgorithm())), zap.String("message_type", r.GetMessageType().String()), zap.Int("message_len", len(r.GetMessage())))
	case *pb.GetPublicKeyRequest:
		sel = r.GetKey()
	case *pb.EchoRequest:
		f = append(f, zap.Int("payload_len", len(r.GetPayload())))
	}
	switch s := sel.GetSelector().(type) {
	case *pb.KeySelector_KeyType:
		f = append(f, zap.String("key_type", sigalg.TypeName(s.KeyType)))
	case *pb.KeySelector_KeyId:
		f = append(f, zap.String("key_id", s.KeyId))
	}
	return f
}
