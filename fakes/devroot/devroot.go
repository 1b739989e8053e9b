// Package devroot makes a development root for the simulated NSM
// (nitrosign-enclave --dev-simulated-nsm-root): several simulated
// enclaves issuing from one root can be trusted by one test KMS
// (fakes/kmsfake), as AWS KMS trusts the AWS Nitro root. Tests and the
// demo only; never linked into a shipped binary.
package devroot

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"time"
)

// New returns a root CA certificate and its P-384 private key (PKCS #8),
// PEM, in one file's bytes.
func New() ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()),
		Subject: pkix.Name{
			CommonName:         "nitrosign-dev-root NOT GENUINE",
			OrganizationalUnit: []string{"simulated NSM, shared test root"},
			Organization:       []string{"nitrosign development"},
		},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		SignatureAlgorithm:    x509.ECDSAWithSHA384,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	pk, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return append(out, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk})...), nil
}

// Root returns the certificate in a file New made.
func Root(pemBytes []byte) (*x509.Certificate, error) {
	for rest := pemBytes; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			return nil, errNoCert
		}
		if b.Type == "CERTIFICATE" {
			return x509.ParseCertificate(b.Bytes)
		}
	}
}

var errNoCert = errorString("devroot: no certificate")

type errorString string

func (e errorString) Error() string { return string(e) }
