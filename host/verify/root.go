package verify

import (
	"crypto/sha256"
	"crypto/x509"
	_ "embed"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"strings"
	"sync"
)

// AWSRootFingerprint is the SHA-256 of the DER of the AWS Nitro Enclaves
// Root-G1 certificate, as AWS publishes it
// (https://docs.aws.amazon.com/enclaves/latest/user/verify-root.html).
const AWSRootFingerprint = "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B"

// awsRootPEM is AWS_NitroEnclaves_Root-G1 (CN=aws.nitro-enclaves, P-384,
// valid 2019-10-28 to 2049-10-28). Every genuine document carries it, byte
// for byte, as cabundle[0].
//
//go:embed aws-nitro-root-g1.pem
var awsRootPEM []byte

var awsRoot = sync.OnceValues(func() (*x509.Certificate, error) {
	return parsePinnedRoot(awsRootPEM, AWSRootFingerprint)
})

// AWSRoot returns the embedded AWS Nitro Enclaves Root-G1 certificate after
// checking its SHA-256 fingerprint against AWSRootFingerprint. An error
// (wrapping ErrChain) means the binary was built with a wrong root file; no
// document can then be verified against the default root.
func AWSRoot() (*x509.Certificate, error) {
	return awsRoot()
}

func parsePinnedRoot(pemBytes []byte, fingerprint string) (*x509.Certificate, error) {
	block, _ := pem.Decode(pemBytes)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%w: embedded AWS root is not a PEM certificate", ErrChain)
	}
	sum := sha256.Sum256(block.Bytes)
	if got := strings.ToUpper(hex.EncodeToString(sum[:])); got != fingerprint {
		return nil, fmt.Errorf("%w: embedded AWS root has fingerprint %s, want %s", ErrChain, got, fingerprint)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing embedded AWS root: %w", ErrChain, err)
	}
	return cert, nil
}
