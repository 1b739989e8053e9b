package server

import (
	"context"
	"errors"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/enclave/attest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Attester makes attestation documents that bind the signing keys
// (*attest.Attester).
type Attester interface {
	Attest(ctx context.Context, nonce, userData []byte) (*attest.Result, error)
}

// errNoAttester is returned when the server was built without an Attester
// (some tests); the shipped enclave always has one.
var errNoAttester = status.Error(codes.FailedPrecondition, "attestation is not configured on this server")

type attestationService struct {
	pb.UnimplementedAttestationServiceServer
	attester Attester
	log      *zap.Logger
}

func (s *attestationService) Attest(ctx context.Context, req *pb.AttestRequest) (*pb.AttestResponse, error) {
	if s.attester == nil {
		return nil, errNoAttester
	}
	res, err := s.attester.Attest(ctx, req.GetNonce(), req.GetUserData())
	if err != nil {
		return nil, toStatus(s.log, "attest", err)
	}
	resp := &pb.AttestResponse{Document: res.Document, Keys: res.Keys, Simulated: res.Simulated, Policy: res.Policy}
	if res.Simulated {
		resp.SimulatedRootCertificate = res.RootDER
	}
	return resp, nil
}

// mapAttestError maps attestation domain errors to their status.
func mapAttestError(err error) (*status.Status, bool) {
	switch {
	case errors.Is(err, attest.ErrInvalidArgument):
		return status.New(codes.InvalidArgument, detail(err, attest.ErrInvalidArgument)), true
	case errors.Is(err, attest.ErrNSM):
		return status.New(codes.Unavailable, "the Nitro Secure Module could not produce an attestation document; try again"), true
	case errors.Is(err, attest.ErrKeys):
		return status.New(codes.FailedPrecondition, "signing keys are not ready for attestation"), true
	}
	return nil, false
}
