package server

import (
	"context"
	"errors"
	"fmt"
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
	_ pb.KeyAdminServiceServer    = (*keyAdminService)(nil)
	_ pb.SessionServiceServer     = (*sessionService)(nil)
)

type sessionService struct {
	pb.UnimplementedSessionServiceServer
	opener SessionOpener // nil: no caller is authenticated, so no sessions
}

func (s *sessionService) OpenSession(ctx context.Context, req *pb.OpenSessionRequest) (*pb.OpenSessionResponse, error) {
	if s.opener == nil {
		return nil, status.Error(codes.Unimplemented, "this server does not authenticate callers: it has no sessions")
	}
	return s.opener.OpenSession(ctx, req)
}

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
	if reason := s.signer.NotReady(); reason != "" {
		return nil, toStatus(s.log, "list keys", fmt.Errorf("%w: %s", signer.ErrNotReady, reason))
	}
	return &pb.ListKeysResponse{Keys: s.signer.Keys()}, nil
}

// errEphemeral answers KeyAdminService on an enclave with ephemeral keys.
var errEphemeral = status.Error(codes.FailedPrecondition, "this enclave's keys are ephemeral (--key-mode ephemeral): they are never stored, so there is no keyset to rotate; run it with --key-mode sealed")

type keyAdminService struct {
	pb.UnimplementedKeyAdminServiceServer
	admin KeyAdmin
	log   *zap.Logger
}

func (s *keyAdminService) CreateKey(ctx context.Context, req *pb.CreateKeyRequest) (*pb.CreateKeyResponse, error) {
	if s.admin == nil {
		return nil, errEphemeral
	}
	k, err := s.admin.CreateKey(ctx, req.GetKeyType())
	if err != nil {
		return nil, toStatus(s.log, "create key", err)
	}
	return &pb.CreateKeyResponse{Key: k}, nil
}

func (s *keyAdminService) DisableKey(ctx context.Context, req *pb.DisableKeyRequest) (*pb.DisableKeyResponse, error) {
	if s.admin == nil {
		return nil, errEphemeral
	}
	k, err := s.admin.SetKeyEnabled(ctx, req.GetKeyId(), false)
	if err != nil {
		return nil, toStatus(s.log, "disable key", err)
	}
	return &pb.DisableKeyResponse{Key: k}, nil
}

func (s *keyAdminService) EnableKey(ctx context.Context, req *pb.EnableKeyRequest) (*pb.EnableKeyResponse, error) {
	if s.admin == nil {
		return nil, errEphemeral
	}
	k, err := s.admin.SetKeyEnabled(ctx, req.GetKeyId(), true)
	if err != nil {
		return nil, toStatus(s.log, "enable key", err)
	}
	return &pb.EnableKeyResponse{Key: k}, nil
}

// Errors of KeyAdmin, besides the signer's: ErrAborted when the change
// lost a race (another enclave changed the keyset first: read it again
// and retry), ErrAdminUnavailable when KMS or the host could not be
// reached to seal or store it (nothing changed; retry later).
var (
	ErrAborted          = errors.New("keyset change aborted")
	ErrAdminUnavailable = errors.New("keyset change not possible now")
)

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
	case errors.Is(err, signer.ErrDisabled):
		return status.Error(codes.FailedPrecondition, detail(err, signer.ErrDisabled))
	case errors.Is(err, signer.ErrNotReady):
		return status.Error(codes.Unavailable, "signing keys not ready: "+detail(err, signer.ErrNotReady))
	case errors.Is(err, ErrAborted):
		return status.Error(codes.Aborted, detail(err, ErrAborted))
	case errors.Is(err, ErrAdminUnavailable):
		return status.Error(codes.Unavailable, detail(err, ErrAdminUnavailable))
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
