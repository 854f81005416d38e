from peers import storescu
def test_orthanc_up(orthanc, shared_data):
    files = sorted((shared_data/"ct_head_phantom_philips_5mm").glob("*.dcm"))[:3]
    r = storescu(files, orthanc.dicom_port, aet=orthanc.aet)
    assert r.returncode == 0, r.stderr
    assert len(orthanc.get("/instances")) == 3
