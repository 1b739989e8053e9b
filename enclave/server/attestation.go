package server

import (
	"context"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Attester makes attestation documents that bind the signing keys.
type Attester interface {
	Attest(ctx context.Context, nonce, userData []byte) (*pb.AttestResponse, error)
}

type noAttester struct{}

func (noAttester) Attest(context.Context, []byte, []byte) (*pb.AttestResponse, error) {
	return nil, status.Error(codes.FailedPrecondition, "attestation is not configured on this server")
}

type attestationService struct {
	pb.UnimplementedAttestationServiceServer
	attester Attester
	log      *zap.Logger
}

func (s *attestationService) Attest(ctx context.Context, req *pb.AttestRequest) (*pb.AttestResponse, error) {
	resp, err := s.attester.Attest(ctx, req.GetNonce(), req.GetUserData())
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, toStatus(s.log, "attest", err)
	}
	return resp, nil
}

// mapAttestError maps attestation domain errors; filled in by the attest wiring.
func mapAttestError(error) (*status.Status, bool) { return nil, false }
