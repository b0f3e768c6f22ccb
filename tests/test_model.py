from elkscan_core import Detection, Job, split_signature


def test_signature_split_follows_elkeid():
    assert split_signature("Unix.Trojan.Mirai-9941418-0") == ("Unix", "Trojan", "Mirai-9941418-0")
    assert split_signature("Unix.Trojan.Mirai-9941418-0.UNOFFICIAL") == ("Unix", "Trojan", "Mirai-9941418-0")
    assert split_signature("YARA.Php_Webshell_Generic_Eval") == ("Php", "Webshell", "Generic_Eval")
    assert split_signature("Eicar-Signature") == ("", "", "Eicar-Signature")
    assert split_signature("Win.Test") == ("", "", "Win.Test")


def test_yara_rule_names_split_on_underscore():
    d = Detection.from_signature("yara", "Linux_Trojan_Mirai_3a85a4a3", yara_rule=True, hit_data=["$a,1,2"])
    assert (d.types, d.class_, d.name, d.hit_data) == ("Linux", "Trojan", "Mirai_3a85a4a3", ("$a,1,2",))
    assert Detection.from_signature("yara", "Short_Name", yara_rule=True).name == "Short_Name"


def test_job_waits_for_every_target():
    job = Job(token="t")
    job.add(2)
    job.finish(detections=1)
    assert not job.wait(0.01)
    job.finish(error=True)
    assert job.wait(0.01)
    assert job.counts == {"pending": 0, "detections": 1, "scanned": 2, "errors": 1}
