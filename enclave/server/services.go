package server

import (
	"context"
	"errors"
	"strings"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/enclave/stats"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Compile-time checks that the services implement the generated interfaces.
var (
	_ pb.EchoServiceServer        = (*echoService)(nil)
	_ pb.SignerServiceServer      = (*signerService)(nil)
	_ pb.AttestationServiceServer = (*attestationService)(nil)
)

type echoService struct {
	pb.UnimplementedEchoServiceServer
}

func (*echoService) Echo(_ context.Context, req *pb.EchoRequest) (*pb.EchoResponse, error) {
	return &pb.EchoResponse{Payload: req.GetPayload(), ReceiveTime: timestamppb.Now()}, nil
}

type signerService struct {
	pb.UnimplementedSignerServiceServer
	signer *signer.Signer
	log    *zap.Logger
	stats  *stats.Stats // nil: signatures are not counted
}

func (s *signerService) Sign(ctx context.Context, req *pb.SignRequest) (*pb.SignResponse, error) {
	sig, err := s.signer.Sign(ctx, req)
	if err != nil {
		return nil, toStatus(s.log, "sign", err)
	}
	if s.stats != nil {
		s.stats.ObserveSignature(sig.Algorithm)
	}
	return &pb.SignResponse{KeyId: sig.KeyID, SigningAlgorithm: sig.Algorithm, Signature: sig.Bytes}, nil
}

func (s *signerService) GetPublicKey(_ context.Context, req *pb.GetPublicKeyRequest) (*pb.GetPublicKeyResponse, error) {
	k, err := s.signer.Key(req.GetKey())
	if err != nil {
		return nil, toStatus(s.log, "get public key", err)
	}
	return &pb.GetPublicKeyResponse{Key: k}, nil
}

func (s *signerService) ListKeys(context.Context, *pb.ListKeysRequest) (*pb.ListKeysResponse, error) {
	return &pb.ListKeysResponse{Keys: s.signer.Keys()}, nil
}

// detail drops the sentinel's own words ("invalid argument: ") from a
// message the status code already says.
func detail(err, sentinel error) string {
	return strings.TrimPrefix(err.Error(), sentinel.Error()+": ")
}

// toStatus maps a domain error to its gRPC status, once, at the edge. Caller
// mistakes keep their message (it names the field, never the bytes);
// anything else is logged and answered with a bare Internal, so no internal
// detail leaks to the caller.
func toStatus(log *zap.Logger, op string, err error) error {
	switch {
	case errors.Is(err, signer.ErrInvalidArgument):
		return status.Error(codes.InvalidArgument, detail(err, signer.ErrInvalidArgument))
	case errors.Is(err, signer.ErrNotFound):
		return status.Error(codes.NotFound, detail(err, signer.ErrNotFound))
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "call canceled by the caller")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded before "+op)
	}
	if st, ok := mapAttestError(err); ok {
		if st.Code() == codes.Unavailable {
			log.Error(op+" failed", zap.Error(err))
		}
		return st.Err()
	}
	log.Error(op+" failed", zap.Error(err))
	return status.Error(codes.Internal, op+" failed: internal error")
}
